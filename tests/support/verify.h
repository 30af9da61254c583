// Signature verification with OpenSSL in software, for tests: the independent check that what
// the HSM made is what TLS peers accept.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hsm/signature_scheme.h"

namespace custody::testing {

// VerifyMessageSignature checks `signature` over `message` with the SubjectPublicKeyInfo
// `spki_der`, as a TLS peer would for `scheme` (PSS: salt length = hash length).
bool VerifyMessageSignature(const std::string& spki_der, hsm::SignatureScheme scheme,
                            const std::string& message, const std::string& signature);

// CertificatePublicKey returns the SubjectPublicKeyInfo (DER) of the PEM certificate file.
std::string CertificatePublicKey(const std::string& pem_path);

}  // namespace custody::testing

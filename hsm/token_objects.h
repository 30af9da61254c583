// Reading objects out of a PKCS#11 token: finding objects by template, reading attributes, and
// turning public-key attributes into a SubjectPublicKeyInfo. Private keys are only ever
// referred to by handle.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "hsm/pkcs11.h"
#include "hsm/signature_scheme.h"

namespace custody::hsm {

// FindObjects returns the handles of every object matching `tmpl` (an empty template matches
// all) in session `s`.
[[nodiscard]] absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(
    CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s, std::vector<CK_ATTRIBUTE> tmpl);

// GetAttribute reads one attribute's value. The token's status (e.g. CKR_ATTRIBUTE_SENSITIVE
// as FAILED_PRECONDITION... mapped by RvToStatus) when it refuses.
[[nodiscard]] absl::StatusOr<std::vector<uint8_t>> GetAttribute(CK_FUNCTION_LIST* fn,
                                                                CK_SESSION_HANDLE s,
                                                                CK_OBJECT_HANDLE obj,
                                                                CK_ATTRIBUTE_TYPE type);

// GetAttributeRv is GetAttribute's raw form for checks that need the exact CK_RV.
CK_RV GetAttributeRv(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj,
                     CK_ATTRIBUTE_TYPE type, std::vector<uint8_t>* out);

// GetBool / GetUlong read a CK_BBOOL / CK_ULONG attribute.
[[nodiscard]] absl::StatusOr<bool> GetBool(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                           CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type);
[[nodiscard]] absl::StatusOr<CK_ULONG> GetUlong(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                                CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type);

// KeyTypeFromEcParams maps a CKA_EC_PARAMS value (a named-curve OID, or the PrintableString
// "edwards25519" some tokens use) to a key type.
[[nodiscard]] absl::StatusOr<KeyType> KeyTypeFromEcParams(const std::vector<uint8_t>& params);

// PublicKey is a key's public half as a SubjectPublicKeyInfo, with its type and size.
struct PublicKey {
  KeyType type;
  uint32_t bits;
  std::vector<uint8_t> spki_der;
};

// ReadPublicKey builds the SubjectPublicKeyInfo of public-key object `obj`.
[[nodiscard]] absl::StatusOr<PublicKey> ReadPublicKey(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                                      CK_OBJECT_HANDLE obj);

// PublicKeyFromCertificate reads the public key of DER certificate `cert_der`.
[[nodiscard]] absl::StatusOr<PublicKey> PublicKeyFromCertificate(
    const std::vector<uint8_t>& cert_der);

// ParseKeyId splits a CKA_ID of the form "NAME/vN" (custody's naming convention: CKA_LABEL is
// the key's name, CKA_ID names the version) into its version, if the name matches `label`.
std::optional<uint32_t> ParseKeyId(const std::string& label, const std::string& id);

// MakeKeyId is the CKA_ID of version `version` of key `name`.
std::string MakeKeyId(const std::string& name, uint32_t version);

}  // namespace custody::hsm

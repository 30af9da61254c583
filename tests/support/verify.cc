#include "tests/support/verify.h"

#include <openssl/pem.h>
#include <openssl/rsa.h>

#include <cstdio>

#include "common/ossl.h"

namespace custody::testing {

bool VerifyMessageSignature(const std::string& spki_der, hsm::SignatureScheme scheme,
                            const std::string& message, const std::string& signature) {
  const auto info = hsm::FindScheme(static_cast<uint16_t>(scheme));
  if (!info) {
    return false;
  }
  const auto* p = reinterpret_cast<const unsigned char*>(spki_der.data());
  OsslPtr<EVP_PKEY> pkey(d2i_PUBKEY(nullptr, &p, static_cast<long>(spki_der.size())));
  OsslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
  if (pkey == nullptr || ctx == nullptr) {
    ClearOsslErrors();
    return false;
  }
  const char* md = info->hash == hsm::HashAlg::kSha256   ? "SHA256"
                   : info->hash == hsm::HashAlg::kSha384 ? "SHA384"
                   : info->hash == hsm::HashAlg::kSha512 ? "SHA512"
                                                         : nullptr;
  EVP_PKEY_CTX* pctx = nullptr;
  bool ok =
      EVP_DigestVerifyInit_ex(ctx.get(), &pctx, md, nullptr, nullptr, pkey.get(), nullptr) == 1;
  if (ok && info->family == hsm::SignFamily::kRsaPss) {
    ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
         EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) == 1;
  } else if (ok && info->family == hsm::SignFamily::kRsaPkcs1) {
    ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) == 1;
  }
  ok = ok &&
       EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                        signature.size(), reinterpret_cast<const unsigned char*>(message.data()),
                        message.size()) == 1;
  ClearOsslErrors();
  return ok;
}

std::string CertificatePublicKey(const std::string& pem_path) {
  FILE* f = std::fopen(pem_path.c_str(), "r");
  if (f == nullptr) {
    return "";
  }
  OsslPtr<X509> cert(PEM_read_X509(f, nullptr, nullptr, nullptr));
  std::fclose(f);
  if (cert == nullptr) {
    ClearOsslErrors();
    return "";
  }
  const int len = i2d_PUBKEY(X509_get0_pubkey(cert.get()), nullptr);
  std::string der(static_cast<std::size_t>(len > 0 ? len : 0), '\0');
  auto* out = reinterpret_cast<unsigned char*>(der.data());
  i2d_PUBKEY(X509_get0_pubkey(cert.get()), &out);
  return der;
}

}  // namespace custody::testing

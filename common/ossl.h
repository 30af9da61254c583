// RAII over OpenSSL objects: OsslPtr<T> is a unique_ptr with the right *_free for T. No naked
// *_free outside these deleters.
#pragma once

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>
#include <openssl/store.h>
#include <openssl/x509.h>

#include <memory>
#include <string>

#include "absl/status/status.h"

namespace custody {

template <typename T>
struct OsslDeleter;

#define CUSTODY_OSSL_DELETER_(type, free_fn)                \
  template <>                                               \
  struct OsslDeleter<type> {                                \
    void operator()(type* p) const noexcept { free_fn(p); } \
  }

CUSTODY_OSSL_DELETER_(ASN1_OCTET_STRING, ASN1_OCTET_STRING_free);
CUSTODY_OSSL_DELETER_(BIO, BIO_free_all);
CUSTODY_OSSL_DELETER_(BIGNUM, BN_free);
CUSTODY_OSSL_DELETER_(ECDSA_SIG, ECDSA_SIG_free);
CUSTODY_OSSL_DELETER_(EVP_CIPHER_CTX, EVP_CIPHER_CTX_free);
CUSTODY_OSSL_DELETER_(EVP_MAC, EVP_MAC_free);
CUSTODY_OSSL_DELETER_(EVP_MAC_CTX, EVP_MAC_CTX_free);
CUSTODY_OSSL_DELETER_(EVP_MD_CTX, EVP_MD_CTX_free);
CUSTODY_OSSL_DELETER_(EVP_PKEY, EVP_PKEY_free);
CUSTODY_OSSL_DELETER_(EVP_PKEY_CTX, EVP_PKEY_CTX_free);
CUSTODY_OSSL_DELETER_(OSSL_LIB_CTX, OSSL_LIB_CTX_free);
CUSTODY_OSSL_DELETER_(OSSL_PARAM, OSSL_PARAM_free);
CUSTODY_OSSL_DELETER_(OSSL_PARAM_BLD, OSSL_PARAM_BLD_free);
CUSTODY_OSSL_DELETER_(OSSL_PROVIDER, OSSL_PROVIDER_unload);
CUSTODY_OSSL_DELETER_(OSSL_STORE_CTX, OSSL_STORE_close);
CUSTODY_OSSL_DELETER_(OSSL_STORE_INFO, OSSL_STORE_INFO_free);
CUSTODY_OSSL_DELETER_(SSL, SSL_free);
CUSTODY_OSSL_DELETER_(SSL_CTX, SSL_CTX_free);
CUSTODY_OSSL_DELETER_(X509, X509_free);
CUSTODY_OSSL_DELETER_(X509_NAME, X509_NAME_free);
#undef CUSTODY_OSSL_DELETER_

template <typename T>
using OsslPtr = std::unique_ptr<T, OsslDeleter<T>>;

// OsslError drains the calling thread's OpenSSL error queue into a status with `code`, whose
// message starts with `what`. The queue is left empty either way.
absl::Status OsslError(absl::StatusCode code, const std::string& what);

// ClearOsslErrors empties the calling thread's OpenSSL error queue.
void ClearOsslErrors();

}  // namespace custody

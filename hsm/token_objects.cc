#include "hsm/token_objects.h"

#include <openssl/core_names.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/ossl.h"

namespace custody::hsm {
namespace {

// DER of the named-curve OIDs (RFC 5480) and of id-Ed25519 (RFC 8410).
const std::vector<uint8_t> kP256Oid = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
const std::vector<uint8_t> kP384Oid = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};
const std::vector<uint8_t> kP521Oid = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23};
const std::vector<uint8_t> kEd25519Oid = {0x06, 0x03, 0x2b, 0x65, 0x70};
const std::vector<uint8_t> kEd25519Name = {0x13, 0x0c, 'e', 'd', 'w', 'a', 'r',
                                           'd',  's',  '2', '5', '5', '1', '9'};

absl::StatusOr<std::vector<uint8_t>> SpkiOf(EVP_PKEY* pkey) {
  const int len = i2d_PUBKEY(pkey, nullptr);
  if (len <= 0) {
    return OsslError(absl::StatusCode::kInternal, "i2d_PUBKEY");
  }
  std::vector<uint8_t> der(static_cast<std::size_t>(len));
  uint8_t* p = der.data();
  i2d_PUBKEY(pkey, &p);
  return der;
}

// FromData builds a public key of `type` ("RSA", "EC") from the parameters in `bld`.
absl::StatusOr<OsslPtr<EVP_PKEY>> FromData(const char* type, OSSL_PARAM_BLD* bld) {
  OsslPtr<OSSL_PARAM> params(OSSL_PARAM_BLD_to_param(bld));
  OsslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* pkey = nullptr;
  if (params == nullptr || ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    return OsslError(absl::StatusCode::kInvalidArgument, "building the public key");
  }
  return OsslPtr<EVP_PKEY>(pkey);
}

// EcPoint returns the raw point of a CKA_EC_POINT value: DER OCTET STRING wrapped (as PKCS#11
// says) or bare (as some tokens do). `raw_len` is the bare length expected for the curve.
absl::StatusOr<std::vector<uint8_t>> UnwrapEcPoint(const std::vector<uint8_t>& value,
                                                   std::size_t raw_len) {
  if (value.size() == raw_len) {
    return value;
  }
  const uint8_t* p = value.data();
  OsslPtr<ASN1_OCTET_STRING> os(
      d2i_ASN1_OCTET_STRING(nullptr, &p, static_cast<long>(value.size())));
  if (os == nullptr || p != value.data() + value.size() ||
      static_cast<std::size_t>(ASN1_STRING_length(os.get())) != raw_len) {
    ClearOsslErrors();
    return absl::InvalidArgumentError("CKA_EC_POINT has an unexpected encoding");
  }
  const uint8_t* data = ASN1_STRING_get0_data(os.get());
  return std::vector<uint8_t>(data, data + raw_len);
}

absl::StatusOr<PublicKey> PublicKeyFromPkey(EVP_PKEY* pkey) {
  PublicKey out{};
  switch (EVP_PKEY_get_base_id(pkey)) {
    case EVP_PKEY_RSA:
      out.type = KeyType::kRsa;
      break;
    case EVP_PKEY_ED25519:
      out.type = KeyType::kEd25519;
      break;
    case EVP_PKEY_EC: {
      char group[64] = {};
      if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                         nullptr) != 1) {
        return OsslError(absl::StatusCode::kInvalidArgument, "EC key without a named curve");
      }
      const std::string g = group;
      if (g == "prime256v1") {
        out.type = KeyType::kEcP256;
      } else if (g == "secp384r1") {
        out.type = KeyType::kEcP384;
      } else if (g == "secp521r1") {
        out.type = KeyType::kEcP521;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("unsupported curve ", g));
      }
      break;
    }
    default:
      return absl::InvalidArgumentError("unsupported public key algorithm");
  }
  out.bits = static_cast<uint32_t>(EVP_PKEY_get_bits(pkey));
  auto spki = SpkiOf(pkey);
  if (!spki.ok()) {
    return spki.status();
  }
  out.spki_der = *std::move(spki);
  return out;
}

}  // namespace

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                                          std::vector<CK_ATTRIBUTE> tmpl) {
  CK_RV rv = fn->C_FindObjectsInit(s, tmpl.data(), tmpl.size());
  if (rv != CKR_OK) {
    return RvToStatus(rv, "C_FindObjectsInit");
  }
  std::vector<CK_OBJECT_HANDLE> out;
  CK_OBJECT_HANDLE batch[64];
  CK_ULONG n = 0;
  do {
    rv = fn->C_FindObjects(s, batch, 64, &n);
    if (rv != CKR_OK) {
      fn->C_FindObjectsFinal(s);
      return RvToStatus(rv, "C_FindObjects");
    }
    out.insert(out.end(), batch, batch + n);
  } while (n == 64);
  rv = fn->C_FindObjectsFinal(s);
  if (rv != CKR_OK) {
    return RvToStatus(rv, "C_FindObjectsFinal");
  }
  return out;
}

CK_RV GetAttributeRv(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj,
                     CK_ATTRIBUTE_TYPE type, std::vector<uint8_t>* out) {
  CK_ATTRIBUTE attr{type, nullptr, 0};
  CK_RV rv = fn->C_GetAttributeValue(s, obj, &attr, 1);
  if (rv != CKR_OK) {
    return rv;
  }
  if (attr.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return CKR_ATTRIBUTE_SENSITIVE;
  }
  out->resize(attr.ulValueLen);
  attr.pValue = out->data();
  return fn->C_GetAttributeValue(s, obj, &attr, 1);
}

absl::StatusOr<std::vector<uint8_t>> GetAttribute(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                                  CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) {
  std::vector<uint8_t> out;
  const CK_RV rv = GetAttributeRv(fn, s, obj, type, &out);
  if (rv != CKR_OK) {
    return RvToStatus(rv, absl::StrCat("C_GetAttributeValue(0x", absl::Hex(type), ")"));
  }
  return out;
}

absl::StatusOr<bool> GetBool(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj,
                             CK_ATTRIBUTE_TYPE type) {
  auto v = GetAttribute(fn, s, obj, type);
  if (!v.ok()) {
    return v.status();
  }
  if (v->size() != sizeof(CK_BBOOL)) {
    return absl::InternalError("boolean attribute of unexpected size");
  }
  return (*v)[0] != CK_FALSE;
}

absl::StatusOr<CK_ULONG> GetUlong(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj,
                                  CK_ATTRIBUTE_TYPE type) {
  auto v = GetAttribute(fn, s, obj, type);
  if (!v.ok()) {
    return v.status();
  }
  if (v->size() != sizeof(CK_ULONG)) {
    return absl::InternalError("integer attribute of unexpected size");
  }
  CK_ULONG out = 0;
  std::memcpy(&out, v->data(), sizeof(out));
  return out;
}

absl::StatusOr<KeyType> KeyTypeFromEcParams(const std::vector<uint8_t>& params) {
  if (params == kP256Oid) {
    return KeyType::kEcP256;
  }
  if (params == kP384Oid) {
    return KeyType::kEcP384;
  }
  if (params == kP521Oid) {
    return KeyType::kEcP521;
  }
  if (params == kEd25519Oid || params == kEd25519Name) {
    return KeyType::kEd25519;
  }
  return absl::InvalidArgumentError("unsupported CKA_EC_PARAMS (not P-256, P-384, P-521, Ed25519)");
}

absl::StatusOr<PublicKey> ReadPublicKey(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                        CK_OBJECT_HANDLE obj) {
  auto key_type = GetUlong(fn, s, obj, CKA_KEY_TYPE);
  if (!key_type.ok()) {
    return key_type.status();
  }
  if (*key_type == CKK_RSA) {
    auto n = GetAttribute(fn, s, obj, CKA_MODULUS);
    auto e = GetAttribute(fn, s, obj, CKA_PUBLIC_EXPONENT);
    if (!n.ok() || !e.ok()) {
      return !n.ok() ? n.status() : e.status();
    }
    OsslPtr<BIGNUM> bn_n(BN_bin2bn(n->data(), static_cast<int>(n->size()), nullptr));
    OsslPtr<BIGNUM> bn_e(BN_bin2bn(e->data(), static_cast<int>(e->size()), nullptr));
    OsslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
    if (bn_n == nullptr || bn_e == nullptr || bld == nullptr ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get()) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get()) != 1) {
      return OsslError(absl::StatusCode::kResourceExhausted, "RSA public key parameters");
    }
    auto pkey = FromData("RSA", bld.get());
    if (!pkey.ok()) {
      return pkey.status();
    }
    return PublicKeyFromPkey(pkey->get());
  }
  if (*key_type != CKK_EC && *key_type != CKK_EC_EDWARDS) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported CKA_KEY_TYPE 0x", absl::Hex(*key_type)));
  }
  auto params = GetAttribute(fn, s, obj, CKA_EC_PARAMS);
  auto point = GetAttribute(fn, s, obj, CKA_EC_POINT);
  if (!params.ok() || !point.ok()) {
    return !params.ok() ? params.status() : point.status();
  }
  auto type = KeyTypeFromEcParams(*params);
  if (!type.ok()) {
    return type.status();
  }
  if (*type == KeyType::kEd25519) {
    auto raw = UnwrapEcPoint(*point, 32);
    if (!raw.ok()) {
      return raw.status();
    }
    OsslPtr<EVP_PKEY> pkey(
        EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, raw->data(), raw->size()));
    if (pkey == nullptr) {
      return OsslError(absl::StatusCode::kInvalidArgument, "Ed25519 public key");
    }
    return PublicKeyFromPkey(pkey.get());
  }
  const char* group = *type == KeyType::kEcP256   ? "prime256v1"
                      : *type == KeyType::kEcP384 ? "secp384r1"
                                                  : "secp521r1";
  const std::size_t field = *type == KeyType::kEcP256 ? 32 : *type == KeyType::kEcP384 ? 48 : 66;
  auto raw = UnwrapEcPoint(*point, 1 + 2 * field);
  if (!raw.ok()) {
    return raw.status();
  }
  OsslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
  if (bld == nullptr ||
      OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, raw->data(),
                                       raw->size()) != 1) {
    return OsslError(absl::StatusCode::kResourceExhausted, "EC public key parameters");
  }
  auto pkey = FromData("EC", bld.get());
  if (!pkey.ok()) {
    return pkey.status();
  }
  return PublicKeyFromPkey(pkey->get());
}

absl::StatusOr<PublicKey> PublicKeyFromCertificate(const std::vector<uint8_t>& cert_der) {
  const uint8_t* p = cert_der.data();
  OsslPtr<X509> cert(d2i_X509(nullptr, &p, static_cast<long>(cert_der.size())));
  if (cert == nullptr) {
    return OsslError(absl::StatusCode::kInvalidArgument, "certificate is not valid DER");
  }
  EVP_PKEY* pkey = X509_get0_pubkey(cert.get());
  if (pkey == nullptr) {
    return OsslError(absl::StatusCode::kInvalidArgument, "certificate public key");
  }
  return PublicKeyFromPkey(pkey);
}

std::optional<uint32_t> ParseKeyId(const std::string& label, const std::string& id) {
  const std::string prefix = label + "/v";
  if (id.size() <= prefix.size() || id.compare(0, prefix.size(), prefix) != 0) {
    return std::nullopt;
  }
  uint32_t version = 0;
  const std::string digits = id.substr(prefix.size());
  if (digits[0] == '0' || !absl::SimpleAtoi(digits, &version) || version == 0) {
    return std::nullopt;
  }
  return version;
}

std::string MakeKeyId(const std::string& name, uint32_t version) {
  return absl::StrCat(name, "/v", version);
}

}  // namespace custody::hsm

#include "hsm/pkcs11_key_backend.h"

#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <ctime>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/ossl.h"
#include "common/status.h"
#include "hsm/token_objects.h"

namespace custody::hsm {
namespace {

constexpr absl::Duration kInventoryTimeout = absl::Seconds(10);

struct TokenCert {
  std::string id;
  std::vector<uint8_t> der;
  OsslPtr<X509> x509;
};

std::string AsString(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

bool SelfSigned(X509* cert) { return X509_check_issued(cert, cert) == X509_V_OK; }

// BuildChain follows issuers from `leaf` among `certs`, stopping before a self-signed root.
std::vector<std::vector<uint8_t>> BuildChain(const TokenCert& leaf,
                                             const std::vector<TokenCert>& certs) {
  std::vector<std::vector<uint8_t>> chain = {leaf.der};
  const TokenCert* cur = &leaf;
  for (int depth = 0; depth < 8 && !SelfSigned(cur->x509.get()); ++depth) {
    const TokenCert* issuer = nullptr;
    for (const TokenCert& c : certs) {
      if (&c != cur && X509_check_issued(c.x509.get(), cur->x509.get()) == X509_V_OK) {
        issuer = &c;
        break;
      }
    }
    if (issuer == nullptr || SelfSigned(issuer->x509.get())) {
      break;
    }
    chain.push_back(issuer->der);
    cur = issuer;
  }
  ClearOsslErrors();
  return chain;
}

int64_t NotAfter(X509* cert) {
  struct tm tm {};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1) {
    ClearOsslErrors();
    return 0;
  }
  return static_cast<int64_t>(timegm(&tm));
}

// SignatureSize is the size of a signature by a key of `type` and `bits`, as the token returns
// it (raw r||s for ECDSA).
std::size_t SignatureSize(KeyType type, uint32_t bits) {
  switch (type) {
    case KeyType::kRsa:
      return (bits + 7) / 8;
    case KeyType::kEd25519:
      return 64;
    default:
      return 2 * ((bits + 7) / 8);
  }
}

// ReadCertificates reads every X.509 certificate object of the token.
absl::StatusOr<std::vector<TokenCert>> ReadCertificates(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s) {
  CK_OBJECT_CLASS cert_class = CKO_CERTIFICATE;
  CUSTODY_ASSIGN_OR_RETURN(const std::vector<CK_OBJECT_HANDLE> handles,
                           FindObjects(fn, s, {{CKA_CLASS, &cert_class, sizeof(cert_class)}}));
  std::vector<TokenCert> certs;
  for (CK_OBJECT_HANDLE h : handles) {
    CUSTODY_ASSIGN_OR_RETURN(const std::vector<uint8_t> id, GetAttribute(fn, s, h, CKA_ID));
    CUSTODY_ASSIGN_OR_RETURN(std::vector<uint8_t> value, GetAttribute(fn, s, h, CKA_VALUE));
    const uint8_t* p = value.data();
    OsslPtr<X509> x509(d2i_X509(nullptr, &p, static_cast<long>(value.size())));
    if (x509 == nullptr) {
      ClearOsslErrors();
      spdlog::warn("hsm: certificate object id='{}' is not a DER X.509 certificate; ignored",
                   AsString(id));
      continue;
    }
    certs.push_back(TokenCert{AsString(id), std::move(value), std::move(x509)});
  }
  return certs;
}

// KeyObject is what the inventory learns of one private key object.
struct KeyObject {
  std::string name;
  std::string id;
  uint32_t version = 0;
};

// ReadKeyObject reads a private key's name, version and protection. nullopt (logged) for a
// key that is not served: not named by the convention, or not protected.
absl::StatusOr<std::optional<KeyObject>> ReadKeyObject(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                                       CK_OBJECT_HANDLE h) {
  CUSTODY_ASSIGN_OR_RETURN(const std::vector<uint8_t> label, GetAttribute(fn, s, h, CKA_LABEL));
  CUSTODY_ASSIGN_OR_RETURN(const std::vector<uint8_t> id, GetAttribute(fn, s, h, CKA_ID));
  KeyObject key{AsString(label), AsString(id)};
  const std::optional<uint32_t> version = ParseKeyId(key.name, key.id);
  if (!version) {
    spdlog::warn("hsm: private key label='{}' has CKA_ID '{}', not '{}/vN'; not served", key.name,
                 key.id, key.name);
    return std::nullopt;
  }
  key.version = *version;
  bool protected_key = true;
  for (const auto& [attr, want] : {std::pair{CKA_SENSITIVE, true},
                                   {CKA_ALWAYS_SENSITIVE, true},
                                   {CKA_EXTRACTABLE, false},
                                   {CKA_NEVER_EXTRACTABLE, true}}) {
    CUSTODY_ASSIGN_OR_RETURN(const bool value, GetBool(fn, s, h, attr));
    protected_key = protected_key && value == want;
  }
  if (!protected_key) {
    spdlog::error(
        "hsm: key {} v{} is or was exposed (it must be sensitive and never extractable since its "
        "generation in the token); refusing to serve it",
        key.name, key.version);
    return std::nullopt;
  }
  return key;
}

// ReadPublicHalf finds the public key of `key`: its public key object, else its certificate.
absl::StatusOr<PublicKey> ReadPublicHalf(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                         const KeyObject& key, const TokenCert* leaf) {
  CK_OBJECT_CLASS pub_class = CKO_PUBLIC_KEY;
  std::string id = key.id;
  CUSTODY_ASSIGN_OR_RETURN(
      const std::vector<CK_OBJECT_HANDLE> pubs,
      FindObjects(fn, s,
                  {{CKA_CLASS, &pub_class, sizeof(pub_class)}, {CKA_ID, id.data(), id.size()}}));
  if (!pubs.empty()) {
    return ReadPublicKey(fn, s, pubs.front());
  }
  if (leaf != nullptr) {
    return PublicKeyFromCertificate(leaf->der);
  }
  return absl::NotFoundError("neither a public key object nor a certificate");
}

// FindPrivateKey looks a key's private object up again by its CKA_ID.
absl::StatusOr<CK_OBJECT_HANDLE> FindPrivateKey(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s,
                                                const KeyVersionInfo& info) {
  CK_OBJECT_CLASS key_class = CKO_PRIVATE_KEY;
  std::string id = MakeKeyId(info.name, info.version);
  CUSTODY_ASSIGN_OR_RETURN(
      const std::vector<CK_OBJECT_HANDLE> keys,
      FindObjects(fn, s,
                  {{CKA_CLASS, &key_class, sizeof(key_class)}, {CKA_ID, id.data(), id.size()}}));
  if (keys.empty()) {
    return absl::UnavailableError(absl::StrCat("key object ", id, " is gone from the token"));
  }
  return keys.front();
}

// CheckLoggedIn fails UNAVAILABLE unless session `s` is in a user state: a token that logged
// out answers C_FindObjects with nothing rather than with an error.
absl::Status CheckLoggedIn(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s) {
  CK_SESSION_INFO info{};
  if (CK_RV rv = fn->C_GetSessionInfo(s, &info); rv != CKR_OK) {
    return RvToStatus(rv, "C_GetSessionInfo");
  }
  if (info.state != CKS_RW_USER_FUNCTIONS && info.state != CKS_RO_USER_FUNCTIONS) {
    return absl::UnavailableError("the token session is not logged in");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Pkcs11KeyBackend>> Pkcs11KeyBackend::Open(
    const Pkcs11Options& options) {
  CUSTODY_ASSIGN_OR_RETURN(std::shared_ptr<Pkcs11Module> module,
                           Pkcs11Module::Load(options.module_path));
  CUSTODY_ASSIGN_OR_RETURN(const CK_SLOT_ID slot,
                           module->FindSlotByTokenLabel(options.token_label));
  auto pool = std::make_unique<SessionPool>(std::move(module), slot, options.pin,
                                            options.sessions == 0 ? 1 : options.sessions);
  std::unique_ptr<Pkcs11KeyBackend> backend(new Pkcs11KeyBackend(std::move(pool)));
  CUSTODY_RETURN_IF_ERROR(backend->Refresh());
  return backend;
}

absl::StatusOr<Pkcs11KeyBackend::Inventory> Pkcs11KeyBackend::LoadInventory() {
  CUSTODY_ASSIGN_OR_RETURN(SessionPool::Lease lease,
                           pool_->Acquire(absl::Now() + kInventoryTimeout));
  CK_FUNCTION_LIST* fn = pool_->module()->fn();
  const CK_SESSION_HANDLE s = lease.get();
  // Any failure while reading is the token's (every attribute read here exists on every such
  // object): give the session up and keep the old inventory.
  lease.MarkBroken(SessionFault::kLoginLost);
  CUSTODY_RETURN_IF_ERROR(CheckLoggedIn(fn, s));
  CUSTODY_ASSIGN_OR_RETURN(const std::vector<TokenCert> certs, ReadCertificates(fn, s));
  CK_OBJECT_CLASS key_class = CKO_PRIVATE_KEY;
  CUSTODY_ASSIGN_OR_RETURN(const std::vector<CK_OBJECT_HANDLE> keys,
                           FindObjects(fn, s, {{CKA_CLASS, &key_class, sizeof(key_class)}}));
  Inventory inventory;
  for (CK_OBJECT_HANDLE h : keys) {
    CUSTODY_ASSIGN_OR_RETURN(const std::optional<KeyObject> key, ReadKeyObject(fn, s, h));
    if (!key) {
      continue;
    }
    const TokenCert* leaf = nullptr;
    for (const TokenCert& c : certs) {
      leaf = c.id == key->id ? &c : leaf;
    }
    absl::StatusOr<PublicKey> pub = ReadPublicHalf(fn, s, *key, leaf);
    if (!pub.ok()) {
      spdlog::warn("hsm: key {} v{}: no usable public key ({}); not served", key->name,
                   key->version, pub.status().message());
      continue;
    }
    Entry entry{KeyVersionInfo{key->name, key->version, pub->type, pub->bits, pub->spki_der},
                std::make_shared<std::atomic<CK_OBJECT_HANDLE>>(h)};
    if (leaf != nullptr) {
      auto leaf_pub = PublicKeyFromCertificate(leaf->der);
      if (leaf_pub.ok() && leaf_pub->spki_der == pub->spki_der) {
        entry.info.certificate_chain = BuildChain(*leaf, certs);
        entry.info.not_after = NotAfter(leaf->x509.get());
      } else {
        spdlog::warn("hsm: key {} v{}: certificate does not match the key; ignored", key->name,
                     key->version);
      }
    }
    inventory[key->name].push_back(std::move(entry));
  }
  for (auto& [name, versions] : inventory) {
    std::sort(versions.begin(), versions.end(),
              [](const Entry& a, const Entry& b) { return a.info.version < b.info.version; });
  }
  lease.MarkBroken(SessionFault::kNone);
  return inventory;
}

absl::Status Pkcs11KeyBackend::Refresh() {
  CUSTODY_ASSIGN_OR_RETURN(Inventory inventory, LoadInventory());
  std::vector<std::string> names;
  for (const auto& [name, versions] : inventory) {
    names.push_back(absl::StrCat(name, " (", versions.size(), " version",
                                 versions.size() == 1 ? "" : "s", ")"));
  }
  spdlog::info("hsm: key inventory: {} key(s): {}", inventory.size(), absl::StrJoin(names, ", "));
  auto snapshot = std::make_shared<const Inventory>(std::move(inventory));
  std::lock_guard<std::mutex> lock(mu_);
  inventory_ = std::move(snapshot);
  return absl::OkStatus();
}

std::shared_ptr<const Pkcs11KeyBackend::Inventory> Pkcs11KeyBackend::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return inventory_;
}

std::vector<KeyVersionInfo> Pkcs11KeyBackend::ListKeys() const {
  std::vector<KeyVersionInfo> out;
  for (const auto& [name, versions] : *Snapshot()) {
    for (const Entry& e : versions) {
      out.push_back(e.info);
    }
  }
  return out;
}

bool Pkcs11KeyBackend::HasKey(const std::string& name) const {
  return Snapshot()->count(name) != 0;
}

absl::StatusOr<Pkcs11KeyBackend::EntryRef> Pkcs11KeyBackend::FindEntry(const std::string& name,
                                                                       uint32_t version) const {
  std::shared_ptr<const Inventory> inv = Snapshot();
  auto it = inv->find(name);
  if (it == inv->end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("no key named '", name, "'"));
  }
  if (version == 0) {
    const Entry* latest = &it->second.back();
    return EntryRef{std::move(inv), latest};
  }
  for (const Entry& e : it->second) {
    if (e.info.version == version) {
      return EntryRef{std::move(inv), &e};
    }
  }
  return absl::NotFoundError(absl::StrCat("key '", name, "' has no version ", version));
}

CK_RV Pkcs11KeyBackend::SignOnce(CK_SESSION_HANDLE s, const Entry& entry, const SignInput& input,
                                 std::vector<uint8_t>* out) {
  CK_FUNCTION_LIST* fn = pool_->module()->fn();
  CK_MECHANISM mech{};
  CK_RSA_PKCS_PSS_PARAMS pss{};
  std::vector<uint8_t> data;
  switch (input.scheme.family) {
    case SignFamily::kEcdsa:
      mech.mechanism = CKM_ECDSA;
      data = input.data;
      break;
    case SignFamily::kRsaPkcs1: {
      mech.mechanism = CKM_RSA_PKCS;
      const auto prefix = DigestInfoPrefix(input.scheme.hash);
      data.assign(prefix.begin(), prefix.end());
      data.insert(data.end(), input.data.begin(), input.data.end());
      break;
    }
    case SignFamily::kRsaPss:
      // TLS fixes the salt length to the hash length (RFC 8446, 4.2.3).
      pss.hashAlg = input.scheme.hash == HashAlg::kSha256   ? CKM_SHA256
                    : input.scheme.hash == HashAlg::kSha384 ? CKM_SHA384
                                                            : CKM_SHA512;
      pss.mgf = input.scheme.hash == HashAlg::kSha256   ? CKG_MGF1_SHA256
                : input.scheme.hash == HashAlg::kSha384 ? CKG_MGF1_SHA384
                                                        : CKG_MGF1_SHA512;
      pss.sLen = HashLength(input.scheme.hash);
      mech = {CKM_RSA_PKCS_PSS, &pss, sizeof(pss)};
      data = input.data;
      break;
    case SignFamily::kEd25519:
      mech.mechanism = CKM_EDDSA;
      data = input.data;
      break;
  }
  CK_RV rv = fn->C_SignInit(s, &mech, entry.private_key->load());
  if (rv != CKR_OK) {
    return rv;
  }
  out->resize(SignatureSize(entry.info.type, entry.info.bits));
  CK_ULONG sig_len = out->size();
  rv = fn->C_Sign(s, data.data(), data.size(), out->data(), &sig_len);
  out->resize(rv == CKR_OK ? sig_len : 0);
  return rv;
}

absl::StatusOr<SignResult> Pkcs11KeyBackend::Sign(const std::string& name, uint32_t version,
                                                  const SignInput& input, absl::Time deadline) {
  CUSTODY_ASSIGN_OR_RETURN(const EntryRef ref, FindEntry(name, version));
  const Entry& entry = *ref.entry;
  if (!SchemeSuitsKey(input.scheme, entry.info.type)) {
    std::vector<std::string> can;
    for (SignatureScheme s : SchemesForKey(entry.info.type)) {
      can.emplace_back(FindScheme(static_cast<uint16_t>(s))->name);
    }
    return absl::InvalidArgumentError(
        absl::StrCat("scheme ", input.scheme.name, " does not suit key '", name, "' (",
                     KeyTypeName(entry.info.type), "); it signs with: ", absl::StrJoin(can, ", ")));
  }
  // One recovery, then the error stands: after any session fault the retry runs on a fresh,
  // logged-in session and looks the key object up again (its handle may be stale).
  CK_RV rv = CKR_OK;
  for (int attempt = 0; attempt < 2; ++attempt) {
    CUSTODY_ASSIGN_OR_RETURN(SessionPool::Lease lease, pool_->Acquire(deadline));
    if (attempt > 0) {
      absl::StatusOr<CK_OBJECT_HANDLE> handle =
          FindPrivateKey(pool_->module()->fn(), lease.get(), entry.info);
      if (!handle.ok()) {
        lease.MarkBroken(SessionFault::kLoginLost);
        return absl::UnavailableError(
            absl::StrCat("HSM recovery failed for '", name, "': ", handle.status().message()));
      }
      entry.private_key->store(*handle);
    }
    std::vector<uint8_t> raw;
    rv = SignOnce(lease.get(), entry, input, &raw);
    if (rv == CKR_OK) {
      SignResult result;
      result.version = entry.info.version;
      if (input.scheme.family == SignFamily::kEcdsa) {
        CUSTODY_ASSIGN_OR_RETURN(result.signature, EcdsaRawToDer(raw));
      } else {
        result.signature = std::move(raw);
      }
      return result;
    }
    const SessionFault fault = ClassifySessionFault(rv);
    if (fault == SessionFault::kNone) {
      return RvToStatus(rv, "C_Sign");
    }
    lease.MarkBroken(fault);
    spdlog::warn("hsm: signing with {} v{} failed with {}{}", name, entry.info.version, RvName(rv),
                 attempt == 0 ? "; recovering once" : "");
  }
  return absl::UnavailableError(
      absl::StrCat("HSM failed twice signing with '", name, "': ", RvName(rv)));
}

absl::Status Pkcs11KeyBackend::SimulateTokenReset() {
  return pool_->RunQuiescent(
      absl::Now() + kInventoryTimeout,
      [this] { return pool_->module()->fn()->C_CloseAllSessions(pool_->slot()); },
      "C_CloseAllSessions");
}

absl::StatusOr<KeyObjectAttributes> Pkcs11KeyBackend::ReadKeyAttributes(const std::string& name,
                                                                        uint32_t version) {
  CUSTODY_ASSIGN_OR_RETURN(const EntryRef ref, FindEntry(name, version));
  const Entry& entry = *ref.entry;
  CUSTODY_ASSIGN_OR_RETURN(SessionPool::Lease lease,
                           pool_->Acquire(absl::Now() + kInventoryTimeout));
  CK_FUNCTION_LIST* fn = pool_->module()->fn();
  const CK_OBJECT_HANDLE h = entry.private_key->load();
  KeyObjectAttributes attrs;
  CUSTODY_ASSIGN_OR_RETURN(attrs.sensitive, GetBool(fn, lease.get(), h, CKA_SENSITIVE));
  CUSTODY_ASSIGN_OR_RETURN(attrs.extractable, GetBool(fn, lease.get(), h, CKA_EXTRACTABLE));
  CUSTODY_ASSIGN_OR_RETURN(attrs.always_sensitive,
                           GetBool(fn, lease.get(), h, CKA_ALWAYS_SENSITIVE));
  CUSTODY_ASSIGN_OR_RETURN(attrs.never_extractable,
                           GetBool(fn, lease.get(), h, CKA_NEVER_EXTRACTABLE));
  // The private value: CKA_VALUE for EC and EdDSA keys, the private exponent for RSA.
  const CK_ATTRIBUTE_TYPE secret =
      entry.info.type == KeyType::kRsa ? CKA_PRIVATE_EXPONENT : CKA_VALUE;
  std::vector<uint8_t> value;
  attrs.value_read_rv = GetAttributeRv(fn, lease.get(), h, secret, &value);
  return attrs;
}

}  // namespace custody::hsm

#include "hsm/pkcs11_key_backend.h"

#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>

#include <ctime>

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
    return 0;
  }
  return static_cast<int64_t>(timegm(&tm));
}

std::string AsString(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

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

  CK_OBJECT_CLASS cert_class = CKO_CERTIFICATE;
  auto cert_handles = FindObjects(fn, s, {{CKA_CLASS, &cert_class, sizeof(cert_class)}});
  if (!cert_handles.ok()) {
    lease.MarkLost();
    return cert_handles.status();
  }
  std::vector<TokenCert> certs;
  for (CK_OBJECT_HANDLE h : *cert_handles) {
    auto id = GetAttribute(fn, s, h, CKA_ID);
    auto value = GetAttribute(fn, s, h, CKA_VALUE);
    if (!id.ok() || !value.ok()) {
      continue;
    }
    const uint8_t* p = value->data();
    OsslPtr<X509> x509(d2i_X509(nullptr, &p, static_cast<long>(value->size())));
    if (x509 == nullptr) {
      ClearOsslErrors();
      spdlog::warn("hsm: certificate object id='{}' is not a DER X.509 certificate; ignored",
                   AsString(*id));
      continue;
    }
    certs.push_back(TokenCert{AsString(*id), *std::move(value), std::move(x509)});
  }

  CK_OBJECT_CLASS key_class = CKO_PRIVATE_KEY;
  CUSTODY_ASSIGN_OR_RETURN(const std::vector<CK_OBJECT_HANDLE> keys,
                           FindObjects(fn, s, {{CKA_CLASS, &key_class, sizeof(key_class)}}));
  Inventory inventory;
  for (CK_OBJECT_HANDLE h : keys) {
    auto label = GetAttribute(fn, s, h, CKA_LABEL);
    auto id = GetAttribute(fn, s, h, CKA_ID);
    if (!label.ok() || !id.ok()) {
      continue;
    }
    const std::string name = AsString(*label);
    const std::string id_str = AsString(*id);
    const std::optional<uint32_t> version = ParseKeyId(name, id_str);
    if (!version) {
      spdlog::warn("hsm: private key label='{}' has CKA_ID '{}', not '{}/vN'; not served", name,
                   id_str, name);
      continue;
    }
    auto sensitive = GetBool(fn, s, h, CKA_SENSITIVE);
    auto extractable = GetBool(fn, s, h, CKA_EXTRACTABLE);
    if (!sensitive.ok() || !extractable.ok() || !*sensitive || *extractable) {
      spdlog::error(
          "hsm: key {} v{} is not protected (CKA_SENSITIVE must be true, CKA_EXTRACTABLE "
          "false); refusing to serve it",
          name, *version);
      continue;
    }
    Entry entry;
    entry.private_key = h;
    entry.info.name = name;
    entry.info.version = *version;

    const TokenCert* leaf = nullptr;
    for (const TokenCert& c : certs) {
      if (c.id == id_str) {
        leaf = &c;
      }
    }
    CK_OBJECT_CLASS pub_class = CKO_PUBLIC_KEY;
    absl::StatusOr<PublicKey> pub = absl::NotFoundError("no public key object");
    auto pubs = FindObjects(fn, s,
                            {{CKA_CLASS, &pub_class, sizeof(pub_class)},
                             {CKA_ID, id->data(), id->size()}});
    if (pubs.ok() && !pubs->empty()) {
      pub = ReadPublicKey(fn, s, pubs->front());
    }
    if (!pub.ok() && leaf != nullptr) {
      pub = PublicKeyFromCertificate(leaf->der);
    }
    if (!pub.ok()) {
      spdlog::warn("hsm: key {} v{}: no usable public key ({}); not served", name, *version,
                   pub.status().message());
      continue;
    }
    entry.info.type = pub->type;
    entry.info.bits = pub->bits;
    entry.info.public_key_der = pub->spki_der;
    if (leaf != nullptr) {
      auto leaf_pub = PublicKeyFromCertificate(leaf->der);
      if (leaf_pub.ok() && leaf_pub->spki_der == pub->spki_der) {
        entry.info.certificate_chain = BuildChain(*leaf, certs);
        entry.info.not_after = NotAfter(leaf->x509.get());
      } else {
        spdlog::warn("hsm: key {} v{}: certificate does not match the key; ignored", name,
                     *version);
      }
    }
    inventory[name].push_back(std::move(entry));
  }
  for (auto& [name, versions] : inventory) {
    std::sort(versions.begin(), versions.end(), [](const Entry& a, const Entry& b) {
      return a.info.version < b.info.version;
    });
  }
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
  absl::MutexLock lock(&mu_);
  inventory_ = std::move(snapshot);
  return absl::OkStatus();
}

std::vector<KeyVersionInfo> Pkcs11KeyBackend::ListKeys() const {
  std::shared_ptr<const Inventory> inv;
  {
    absl::MutexLock lock(&mu_);
    inv = inventory_;
  }
  std::vector<KeyVersionInfo> out;
  for (const auto& [name, versions] : *inv) {
    for (const Entry& e : versions) {
      out.push_back(e.info);
    }
  }
  return out;
}

absl::StatusOr<Pkcs11KeyBackend::Entry> Pkcs11KeyBackend::FindEntry(const std::string& name,
                                                                    uint32_t version) const {
  std::shared_ptr<const Inventory> inv;
  {
    absl::MutexLock lock(&mu_);
    inv = inventory_;
  }
  auto it = inv->find(name);
  if (it == inv->end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("no key named '", name, "'"));
  }
  if (version == 0) {
    return it->second.back();
  }
  for (const Entry& e : it->second) {
    if (e.info.version == version) {
      return e;
    }
  }
  return absl::NotFoundError(absl::StrCat("key '", name, "' has no version ", version));
}

CK_RV Pkcs11KeyBackend::SignOnce(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key,
                                 const SignInput& input, std::vector<uint8_t>* out) {
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
  CK_RV rv = fn->C_SignInit(s, &mech, key);
  if (rv != CKR_OK) {
    return rv;
  }
  uint8_t sig[1024];
  CK_ULONG sig_len = sizeof(sig);
  rv = fn->C_Sign(s, data.data(), data.size(), sig, &sig_len);
  if (rv == CKR_OK) {
    out->assign(sig, sig + sig_len);
  }
  return rv;
}

absl::StatusOr<SignResult> Pkcs11KeyBackend::Sign(const std::string& name, uint32_t version,
                                                  const SignInput& input, absl::Time deadline) {
  CUSTODY_ASSIGN_OR_RETURN(Entry entry, FindEntry(name, version));
  if (!SchemeSuitsKey(input.scheme, entry.info.type)) {
    std::vector<std::string> can;
    for (SignatureScheme s : SchemesForKey(entry.info.type)) {
      can.emplace_back(FindScheme(static_cast<uint16_t>(s))->name);
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "scheme ", input.scheme.name, " does not suit key '", name, "' (",
        KeyTypeName(entry.info.type), "); it signs with: ", absl::StrJoin(can, ", ")));
  }
  // One recovery: a lost session (token reset, logout) is replaced by a fresh, logged-in one;
  // a stale object handle (token restarted) is looked up again. Then the error stands.
  CK_RV rv = CKR_OK;
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::vector<uint8_t> raw;
    {
      CUSTODY_ASSIGN_OR_RETURN(SessionPool::Lease lease, pool_->Acquire(deadline));
      rv = SignOnce(lease.get(), entry.private_key, input, &raw);
      if (IsSessionLost(rv)) {
        lease.MarkLost();
      }
    }
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
    if (!IsSessionLost(rv) && !IsObjectStale(rv)) {
      return RvToStatus(rv, "C_Sign");
    }
    spdlog::warn("hsm: signing with {} v{} failed with {}{}", name, entry.info.version,
                 RvName(rv), attempt == 0 ? "; recovering once" : "");
    if (attempt == 0 && IsObjectStale(rv)) {
      // Object handles belong to one token instance: read the inventory again.
      if (absl::Status st = Refresh(); !st.ok()) {
        return absl::UnavailableError(absl::StrCat("HSM inventory refresh failed: ",
                                                   st.message()));
      }
      CUSTODY_ASSIGN_OR_RETURN(entry, FindEntry(name, entry.info.version));
    }
  }
  return absl::UnavailableError(absl::StrCat("HSM failed twice signing with '", name,
                                             "': ", RvName(rv)));
}

absl::Status Pkcs11KeyBackend::SimulateTokenReset() { return pool_->CloseAllSessions(); }

absl::StatusOr<KeyObjectAttributes> Pkcs11KeyBackend::ReadKeyAttributes(const std::string& name,
                                                                        uint32_t version) {
  CUSTODY_ASSIGN_OR_RETURN(Entry entry, FindEntry(name, version));
  CUSTODY_ASSIGN_OR_RETURN(SessionPool::Lease lease,
                           pool_->Acquire(absl::Now() + kInventoryTimeout));
  CK_FUNCTION_LIST* fn = pool_->module()->fn();
  KeyObjectAttributes attrs;
  CUSTODY_ASSIGN_OR_RETURN(attrs.sensitive, GetBool(fn, lease.get(), entry.private_key,
                                                    CKA_SENSITIVE));
  CUSTODY_ASSIGN_OR_RETURN(attrs.extractable, GetBool(fn, lease.get(), entry.private_key,
                                                      CKA_EXTRACTABLE));
  CUSTODY_ASSIGN_OR_RETURN(attrs.always_sensitive, GetBool(fn, lease.get(), entry.private_key,
                                                           CKA_ALWAYS_SENSITIVE));
  CUSTODY_ASSIGN_OR_RETURN(attrs.never_extractable, GetBool(fn, lease.get(), entry.private_key,
                                                            CKA_NEVER_EXTRACTABLE));
  // The private value: CKA_VALUE for EC and EdDSA keys, the private exponent for RSA.
  const CK_ATTRIBUTE_TYPE secret =
      entry.info.type == KeyType::kRsa ? CKA_PRIVATE_EXPONENT : CKA_VALUE;
  std::vector<uint8_t> value;
  attrs.value_read_rv = GetAttributeRv(fn, lease.get(), entry.private_key, secret, &value);
  return attrs;
}

}  // namespace custody::hsm

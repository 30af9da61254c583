// The "custody:" store loader: `custody:key=NAME[;version=N]` loads a remote key, so a stock
// OpenSSL program (openssl s_server -key custody:key=web, nginx's store:, curl) uses a key held
// by the key service without knowing it. The key is handed to our key management by reference.
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/params.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstring>
#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "proxy/provider/provider.h"

namespace custody::provider {
namespace {

struct StoreContext {
  ProviderContext* provider = nullptr;
  std::string name;
  uint32_t version = 0;
  bool done = false;
  RemoteKey* key = nullptr;  // Kept until close, so the reference handed out stays valid.

  ~StoreContext() {
    if (key != nullptr) {
      key->Unref();
    }
  }
};

// ParseUri reads "custody:key=NAME[;version=N]".
absl::Status ParseUri(const std::string& uri, StoreContext* ctx) {
  absl::string_view rest(uri);
  if (!absl::ConsumePrefix(&rest, "custody:")) {
    return absl::InvalidArgumentError("not a custody: URI");
  }
  for (absl::string_view part : absl::StrSplit(rest, ';', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (kv.first == "key") {
      ctx->name = kv.second;
    } else if (kv.first == "version") {
      if (!absl::SimpleAtoi(kv.second, &ctx->version) || ctx->version == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("version must be a number from 1, not '", kv.second, "'"));
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown attribute '", kv.first, "' (use key=NAME;version=N)"));
    }
  }
  if (ctx->name.empty()) {
    return absl::InvalidArgumentError("custody: URI without key=NAME");
  }
  return absl::OkStatus();
}

void* Open(void* provctx, const char* uri) {
  auto ctx = std::make_unique<StoreContext>();
  ctx->provider = static_cast<ProviderContext*>(provctx);
  if (absl::Status st = ParseUri(uri, ctx.get()); !st.ok()) {
    RaiseStatus(st);
    return nullptr;
  }
  return ctx.release();
}

// FetchKey asks the key service for the key and builds its RemoteKey.
absl::StatusOr<RemoteKey*> FetchKey(StoreContext& ctx) {
  ProviderContext* prov = ctx.provider;
  if (prov->signer == nullptr) {
    return prov->signer_status;
  }
  absl::StatusOr<custody::v1::Key> key =
      prov->signer->GetKey(ctx.name, absl::Now() + prov->sign_timeout);
  if (!key.ok()) {
    return key.status();
  }
  const uint32_t want = ctx.version != 0 ? ctx.version : key->active_version();
  const custody::v1::KeyVersion* version = nullptr;
  for (const auto& v : key->versions()) {
    version = v.version() == want ? &v : version;
  }
  if (version == nullptr) {
    return absl::NotFoundError(absl::StrCat("key '", ctx.name, "' has no version ", want));
  }
  auto remote = std::make_unique<RemoteKey>();
  remote->provider = prov;
  remote->name = ctx.name;
  remote->version = ctx.version;  // 0 follows the active version, as the service decides.
  const auto* p = reinterpret_cast<const unsigned char*>(version->public_key_der().data());
  remote->pub.reset(d2i_PUBKEY(nullptr, &p, static_cast<long>(version->public_key_der().size())));
  if (remote->pub == nullptr) {
    return OsslError(absl::StatusCode::kInternal, "public key from the key service");
  }
  // The key's algorithm; the provider's family (key management, signature) follows from it.
  static const std::pair<custody::v1::KeyType, hsm::KeyType> kTypes[] = {
      {custody::v1::KEY_TYPE_EC_P256, hsm::KeyType::kEcP256},
      {custody::v1::KEY_TYPE_EC_P384, hsm::KeyType::kEcP384},
      {custody::v1::KEY_TYPE_EC_P521, hsm::KeyType::kEcP521},
      {custody::v1::KEY_TYPE_RSA, hsm::KeyType::kRsa},
      {custody::v1::KEY_TYPE_ED25519, hsm::KeyType::kEd25519}};
  const auto* found = std::find_if(std::begin(kTypes), std::end(kTypes),
                                   [&](const auto& t) { return t.first == key->type(); });
  if (found == std::end(kTypes)) {
    return absl::UnimplementedError("key type not supported by the provider");
  }
  remote->type = found->second;
  remote->kind = remote->type == hsm::KeyType::kRsa       ? RemoteKeyKind::kRsa
                 : remote->type == hsm::KeyType::kEd25519 ? RemoteKeyKind::kEd25519
                                                          : RemoteKeyKind::kEc;
  return remote.release();
}

int Load(void* vctx, OSSL_CALLBACK* object_cb, void* object_cbarg,
         OSSL_PASSPHRASE_CALLBACK* /*pw_cb*/, void* /*pw_cbarg*/) {
  auto* ctx = static_cast<StoreContext*>(vctx);
  ctx->done = true;
  absl::StatusOr<RemoteKey*> key = FetchKey(*ctx);
  if (!key.ok()) {
    return RaiseStatus(key.status());
  }
  ctx->key = *key;
  const char* data_type = ctx->key->kind == RemoteKeyKind::kEc    ? "EC"
                          : ctx->key->kind == RemoteKeyKind::kRsa ? "RSA"
                                                                  : "ED25519";
  int object_type = OSSL_OBJECT_PKEY;
  OSSL_PARAM params[] = {
      OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
      OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, const_cast<char*>(data_type), 0),
      OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &ctx->key, sizeof(ctx->key)),
      OSSL_PARAM_END};
  return object_cb(params, object_cbarg);
}

int Eof(void* vctx) { return static_cast<StoreContext*>(vctx)->done ? 1 : 0; }

int Close(void* vctx) {
  delete static_cast<StoreContext*>(vctx);
  return 1;
}

const OSSL_PARAM kSettable[] = {OSSL_PARAM_int(OSSL_STORE_PARAM_EXPECT, nullptr), OSSL_PARAM_END};

const OSSL_PARAM* SettableCtxParams(void* /*provctx*/) { return kSettable; }

int SetCtxParams(void* /*vctx*/, const OSSL_PARAM /*params*/[]) { return 1; }

}  // namespace

const OSSL_DISPATCH kCustodyStore[] = {
    CUSTODY_OSSL_FN(OSSL_FUNC_STORE_OPEN, Open),
    CUSTODY_OSSL_FN(OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, SettableCtxParams),
    CUSTODY_OSSL_FN(OSSL_FUNC_STORE_SET_CTX_PARAMS, SetCtxParams),
    CUSTODY_OSSL_FN(OSSL_FUNC_STORE_LOAD, Load),
    CUSTODY_OSSL_FN(OSSL_FUNC_STORE_EOF, Eof),
    CUSTODY_OSSL_FN(OSSL_FUNC_STORE_CLOSE, Close),
    {0, nullptr}};

}  // namespace custody::provider

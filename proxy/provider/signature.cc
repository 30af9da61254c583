// Signatures made by the key service: OpenSSL hands us the message (digest_sign) or feeds it
// piecewise (update/final); we hash it here (Ed25519 excepted: it signs the message) and ask the
// key service for the signature under the TLS scheme the parameters name.
#include <openssl/async.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rsa.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "proxy/provider/provider.h"

namespace custody::provider {
namespace {

struct SignatureContext {
  ProviderContext* provider = nullptr;
  RemoteKey* key = nullptr;  // A reference is held while set.
  std::string md;            // "SHA256", "SHA384", "SHA512"; empty for Ed25519.
  int padding = RSA_PKCS1_PADDING;
  int saltlen = RSA_PSS_SALTLEN_DIGEST;
  OsslPtr<EVP_MD_CTX> md_ctx;  // update/final path.
  std::string buffered;        // update/final path for Ed25519.

  ~SignatureContext() {
    if (key != nullptr) {
      key->Unref();
    }
  }
};

SignatureContext* AsCtx(void* ctx) { return static_cast<SignatureContext*>(ctx); }

void* NewCtx(void* provctx, const char* /*propq*/) {
  auto* ctx = new SignatureContext;
  ctx->provider = static_cast<ProviderContext*>(provctx);
  return ctx;
}

void FreeCtx(void* ctx) { delete AsCtx(ctx); }

void* DupCtx(void* ctx) {
  const SignatureContext* src = AsCtx(ctx);
  auto dst = std::make_unique<SignatureContext>();
  dst->provider = src->provider;
  dst->key = src->key;
  if (dst->key != nullptr) {
    dst->key->Ref();
  }
  dst->md = src->md;
  dst->padding = src->padding;
  dst->saltlen = src->saltlen;
  dst->buffered = src->buffered;
  if (src->md_ctx != nullptr) {
    dst->md_ctx.reset(EVP_MD_CTX_new());
    if (dst->md_ctx == nullptr || EVP_MD_CTX_copy_ex(dst->md_ctx.get(), src->md_ctx.get()) != 1) {
      ClearOsslErrors();
      return nullptr;
    }
  }
  return dst.release();
}

// HashOf maps an OpenSSL digest name to custody's hash (empty or unknown: kNone).
hsm::HashAlg HashOf(const std::string& md) {
  const std::string upper = absl::AsciiStrToUpper(md);
  if (upper == "SHA256" || upper == "SHA2-256") {
    return hsm::HashAlg::kSha256;
  }
  if (upper == "SHA384" || upper == "SHA2-384") {
    return hsm::HashAlg::kSha384;
  }
  if (upper == "SHA512" || upper == "SHA2-512") {
    return hsm::HashAlg::kSha512;
  }
  return hsm::HashAlg::kNone;
}

const char* MdName(hsm::HashAlg hash) {
  switch (hash) {
    case hsm::HashAlg::kSha256:
      return "SHA256";
    case hsm::HashAlg::kSha384:
      return "SHA384";
    case hsm::HashAlg::kSha512:
      return "SHA512";
    case hsm::HashAlg::kNone:
      break;
  }
  return "";
}

// SchemeFor picks the TLS scheme from the key, the digest and the padding.
absl::StatusOr<hsm::SchemeInfo> SchemeFor(const SignatureContext& ctx) {
  const hsm::HashAlg hash = HashOf(ctx.md);
  std::optional<hsm::SchemeInfo> found;
  for (const hsm::SchemeInfo& s : hsm::AllSchemes()) {
    if (!hsm::SchemeSuitsKey(s, ctx.key->type) || s.hash != hash) {
      continue;
    }
    if (ctx.key->kind == RemoteKeyKind::kRsa &&
        (s.family == hsm::SignFamily::kRsaPss) != (ctx.padding == RSA_PKCS1_PSS_PADDING)) {
      continue;
    }
    found = s;
  }
  if (!found) {
    return absl::InvalidArgumentError(
        absl::StrCat("no signature scheme for digest '", ctx.md, "' with this key and padding"));
  }
  if (found->family == hsm::SignFamily::kRsaPss && ctx.saltlen != RSA_PSS_SALTLEN_DIGEST &&
      ctx.saltlen != static_cast<int>(hsm::HashLength(hash))) {
    return absl::InvalidArgumentError("RSA-PSS salt length must equal the digest length (TLS)");
  }
  return *found;
}

int SetCtxParams(void* vctx, const OSSL_PARAM params[]) {
  SignatureContext* ctx = AsCtx(vctx);
  if (params == nullptr) {
    return 1;
  }
  const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST);
  if (p != nullptr) {
    const char* md = nullptr;
    if (OSSL_PARAM_get_utf8_string_ptr(p, &md) != 1) {
      return 0;
    }
    ctx->md = md;
  }
  p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
  if (p != nullptr) {
    if (p->data_type == OSSL_PARAM_INTEGER) {
      if (OSSL_PARAM_get_int(p, &ctx->padding) != 1) {
        return 0;
      }
    } else {
      const char* mode = nullptr;
      if (OSSL_PARAM_get_utf8_string_ptr(p, &mode) != 1) {
        return 0;
      }
      ctx->padding = std::strcmp(mode, OSSL_PKEY_RSA_PAD_MODE_PSS) == 0 ? RSA_PKCS1_PSS_PADDING
                                                                        : RSA_PKCS1_PADDING;
    }
  }
  p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
  if (p != nullptr) {
    if (p->data_type == OSSL_PARAM_INTEGER) {
      if (OSSL_PARAM_get_int(p, &ctx->saltlen) != 1) {
        return 0;
      }
    } else {
      const char* len = nullptr;
      if (OSSL_PARAM_get_utf8_string_ptr(p, &len) != 1) {
        return 0;
      }
      // libssl says "digest"; anything else is not what TLS signs with.
      ctx->saltlen = std::strcmp(len, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST) == 0
                         ? RSA_PSS_SALTLEN_DIGEST
                         : RSA_PSS_SALTLEN_MAX;
    }
  }
  return 1;
}

const OSSL_PARAM kSettable[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, nullptr, 0), OSSL_PARAM_END};

const OSSL_PARAM* SettableCtxParams(void* /*ctx*/, void* /*provctx*/) { return kSettable; }

// AlgorithmIdentifier DER for the schemes that have a fixed one (RFC 5758, 8017, 8410).
std::string AlgorithmId(const SignatureContext& ctx) {
  if (ctx.key == nullptr) {
    return "";
  }
  const hsm::HashAlg hash = HashOf(ctx.md);
  switch (ctx.key->kind) {
    case RemoteKeyKind::kEd25519:
      return std::string("\x30\x05\x06\x03\x2b\x65\x70", 7);
    case RemoteKeyKind::kEc: {
      const char last = hash == hsm::HashAlg::kSha256   ? '\x02'
                        : hash == hsm::HashAlg::kSha384 ? '\x03'
                                                        : '\x04';
      return std::string("\x30\x0a\x06\x08\x2a\x86\x48\xce\x3d\x04\x03", 11) + last;
    }
    case RemoteKeyKind::kRsa: {
      if (ctx.padding == RSA_PKCS1_PSS_PADDING) {
        return "";  // PSS parameters vary; nothing that signs certificates asks for them here.
      }
      const char last = hash == hsm::HashAlg::kSha256   ? '\x0b'
                        : hash == hsm::HashAlg::kSha384 ? '\x0c'
                                                        : '\x0d';
      return std::string("\x30\x0d\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01", 12) + last +
             std::string("\x05\x00", 2);
    }
  }
  return "";
}

int GetCtxParams(void* vctx, OSSL_PARAM params[]) {
  SignatureContext* ctx = AsCtx(vctx);
  OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID);
  if (p != nullptr) {
    const std::string id = AlgorithmId(*ctx);
    if (!id.empty() && OSSL_PARAM_set_octet_string(p, id.data(), id.size()) != 1) {
      return 0;
    }
  }
  p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST);
  if (p != nullptr && OSSL_PARAM_set_utf8_string(p, ctx->md.c_str()) != 1) {
    return 0;
  }
  return 1;
}

const OSSL_PARAM kGettable[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0), OSSL_PARAM_END};

const OSSL_PARAM* GettableCtxParams(void* /*ctx*/, void* /*provctx*/) { return kGettable; }

int DigestSignInit(void* vctx, const char* mdname, void* keydata, const OSSL_PARAM params[]) {
  SignatureContext* ctx = AsCtx(vctx);
  auto* key = static_cast<RemoteKey*>(keydata);
  if (key != nullptr) {
    if (key->name.empty()) {
      return RaiseStatus(absl::FailedPreconditionError(
          "this key has no key-service reference, so no private half to sign with"));
    }
    key->Ref();
    if (ctx->key != nullptr) {
      ctx->key->Unref();
    }
    ctx->key = key;
  }
  if (ctx->key == nullptr) {
    return RaiseStatus(absl::InvalidArgumentError("no key"));
  }
  if (mdname != nullptr && *mdname != '\0') {
    ctx->md = mdname;
  } else if (ctx->key->kind != RemoteKeyKind::kEd25519) {
    ctx->md = ctx->key->type == hsm::KeyType::kEcP384   ? "SHA384"
              : ctx->key->type == hsm::KeyType::kEcP521 ? "SHA512"
                                                        : "SHA256";
  }
  ctx->md_ctx.reset();
  ctx->buffered.clear();
  return SetCtxParams(vctx, params);
}

// WaitFd returns the wait fd of `ctx` (an eventfd made on first use and closed with the wait
// context): one per connection for its whole life, so the event loop registers it once.
int WaitFd(ASYNC_WAIT_CTX* ctx) {
  static const char kKey = 0;
  OSSL_ASYNC_FD fd = OSSL_BAD_ASYNC_FD;
  void* custom = nullptr;
  if (ASYNC_WAIT_CTX_get_fd(ctx, &kKey, &fd, &custom) == 1) {
    return fd;
  }
  fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) {
    return -1;
  }
  auto cleanup = [](ASYNC_WAIT_CTX* /*ctx*/, const void* /*key*/, OSSL_ASYNC_FD fd,
                    void* /*custom*/) { ::close(fd); };
  if (ASYNC_WAIT_CTX_set_wait_fd(ctx, &kKey, fd, nullptr, cleanup) != 1) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// SignSlot is one signature awaited by a paused job: filled on a key-client thread.
struct SignSlot {
  std::mutex mu;  // "Done" and the eventfd signal change together under it.
  bool done = false;
  absl::StatusOr<custody::v1::SignResponse> result = absl::UnknownError("not answered");
};

// SignInJob runs inside an ASYNC job (32 KiB stack, no guard page): it only queues the request
// and pauses; the worker's event loop serves other connections until the wait fd fires and it
// resumes the job. The job is resumed on the thread that started it.
absl::StatusOr<custody::v1::SignResponse> SignInJob(KeySigner& signer,
                                                    const custody::v1::SignRequest& request,
                                                    absl::Time deadline) {
  ASYNC_WAIT_CTX* wait_ctx = ASYNC_get_wait_ctx(ASYNC_get_current_job());
  // The answer wakes the job's owner one of two ways: the callback the application asked for
  // (SSL_set_async_callback; custody-proxy), or else the connection's wait fd (stock programs).
  ASYNC_callback_fn callback = nullptr;
  void* callback_arg = nullptr;
  int fd = -1;
  if (ASYNC_WAIT_CTX_get_callback(wait_ctx, &callback, &callback_arg) != 1 || callback == nullptr) {
    callback = nullptr;
    fd = WaitFd(wait_ctx);
    if (fd < 0) {
      return absl::ResourceExhaustedError("no wait fd for the asynchronous signature");
    }
  }
  // "Done" is set and the owner woken under one lock, and the job reads "done" under it: the job
  // cannot finish (and its connection go) before the wake-up has been made.
  auto slot = std::make_shared<SignSlot>();
  signer.SignAsync(request, deadline,
                   [slot, callback, callback_arg, fd](absl::StatusOr<custody::v1::SignResponse> r) {
                     std::lock_guard<std::mutex> lock(slot->mu);
                     slot->result = std::move(r);
                     slot->done = true;
                     if (callback != nullptr) {
                       callback(callback_arg);
                     } else {
                       const uint64_t one = 1;
                       (void)!::write(fd, &one, sizeof(one));
                     }
                   });
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(slot->mu);
      if (fd >= 0) {
        uint64_t drained = 0;
        (void)!::read(fd, &drained, sizeof(drained));  // Spurious wake-ups leave nothing behind.
      }
      if (slot->done) {
        return std::move(slot->result);
      }
    }
    if (ASYNC_pause_job() != 1) {
      return absl::InternalError("ASYNC_pause_job failed");
    }
  }
}

// SignData makes the signature of `data` (the message) into sig/siglen.
int SignData(SignatureContext* ctx, unsigned char* sig, size_t* siglen, size_t sigsize,
             const std::string& message, const std::string* digest) {
  ProviderContext* prov = ctx->provider;
  if (prov->signer == nullptr) {
    return RaiseStatus(prov->signer_status);
  }
  absl::StatusOr<hsm::SchemeInfo> scheme = SchemeFor(*ctx);
  if (!scheme.ok()) {
    return RaiseStatus(scheme.status());
  }
  custody::v1::SignRequest request;
  request.set_key_name(ctx->key->name);
  request.set_version(ctx->key->version);
  request.set_scheme(static_cast<custody::v1::SignatureScheme>(scheme->scheme));
  if (scheme->hash == hsm::HashAlg::kNone) {
    request.set_message(message);
  } else if (digest != nullptr) {
    request.set_digest(*digest);
  } else {
    auto hashed = hsm::Hash(
        scheme->hash,
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(message.data()), message.size()));
    if (!hashed.ok()) {
      return RaiseStatus(hashed.status());
    }
    request.set_digest(hashed->data(), hashed->size());
  }
  absl::StatusOr<custody::v1::SignResponse> response =
      ASYNC_get_current_job() != nullptr
          ? SignInJob(*prov->signer, request, absl::Now() + prov->sign_timeout)
          : prov->signer->Sign(request, absl::Now() + prov->sign_timeout);
  if (!response.ok()) {
    return RaiseStatus(response.status());
  }
  const std::string& signature = response->signature();
  if (signature.size() > sigsize) {
    return RaiseStatus(absl::InternalError("signature larger than the buffer"));
  }
  std::memcpy(sig, signature.data(), signature.size());
  *siglen = signature.size();
  return 1;
}

int DigestSign(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize,
               const unsigned char* tbs, size_t tbslen) {
  SignatureContext* ctx = AsCtx(vctx);
  if (ctx->key == nullptr || ctx->key->pub == nullptr) {
    return RaiseStatus(absl::InvalidArgumentError("no key"));
  }
  if (sig == nullptr) {
    *siglen = static_cast<size_t>(EVP_PKEY_get_size(ctx->key->pub.get()));
    return 1;
  }
  return SignData(ctx, sig, siglen, sigsize,
                  std::string(reinterpret_cast<const char*>(tbs), tbslen), nullptr);
}

int DigestSignUpdate(void* vctx, const unsigned char* data, size_t datalen) {
  SignatureContext* ctx = AsCtx(vctx);
  if (ctx->key == nullptr) {
    return 0;
  }
  if (ctx->key->kind == RemoteKeyKind::kEd25519) {
    ctx->buffered.append(reinterpret_cast<const char*>(data), datalen);
    return 1;
  }
  if (ctx->md_ctx == nullptr) {
    ctx->md_ctx.reset(EVP_MD_CTX_new());
    const EVP_MD* md = EVP_get_digestbyname(MdName(HashOf(ctx->md)));
    if (ctx->md_ctx == nullptr || md == nullptr ||
        EVP_DigestInit_ex(ctx->md_ctx.get(), md, nullptr) != 1) {
      ClearOsslErrors();
      return RaiseStatus(absl::InvalidArgumentError(absl::StrCat("digest '", ctx->md, "'")));
    }
  }
  return EVP_DigestUpdate(ctx->md_ctx.get(), data, datalen);
}

int DigestSignFinal(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize) {
  SignatureContext* ctx = AsCtx(vctx);
  if (ctx->key == nullptr || ctx->key->pub == nullptr) {
    return 0;
  }
  if (sig == nullptr) {
    *siglen = static_cast<size_t>(EVP_PKEY_get_size(ctx->key->pub.get()));
    return 1;
  }
  if (ctx->key->kind == RemoteKeyKind::kEd25519) {
    return SignData(ctx, sig, siglen, sigsize, ctx->buffered, nullptr);
  }
  if (ctx->md_ctx == nullptr && DigestSignUpdate(vctx, nullptr, 0) != 1) {
    return 0;
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_DigestFinal_ex(ctx->md_ctx.get(), md, &md_len) != 1) {
    return 0;
  }
  const std::string digest(reinterpret_cast<const char*>(md), md_len);
  return SignData(ctx, sig, siglen, sigsize, "", &digest);
}

}  // namespace

#define CUSTODY_SIGNATURE_COMMON                                                   \
  CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_NEWCTX, NewCtx),                             \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_FREECTX, FreeCtx),                       \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DUPCTX, DupCtx),                         \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, DigestSignInit),       \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN, DigestSign),                \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, GetCtxParams),           \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, GettableCtxParams), \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, SetCtxParams),           \
      CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, SettableCtxParams)

const OSSL_DISPATCH kEcdsaSignature[] = {
    CUSTODY_SIGNATURE_COMMON,
    CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, DigestSignUpdate),
    CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, DigestSignFinal),
    {0, nullptr}};

const OSSL_DISPATCH kRsaSignature[] = {
    CUSTODY_SIGNATURE_COMMON,
    CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, DigestSignUpdate),
    CUSTODY_OSSL_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, DigestSignFinal),
    {0, nullptr}};

// Ed25519 is one-shot only (as OpenSSL's own): PureEdDSA needs the whole message.
const OSSL_DISPATCH kEd25519Signature[] = {CUSTODY_SIGNATURE_COMMON, {0, nullptr}};

}  // namespace custody::provider

#include "proxy/tls_context.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/store.h>
#include <openssl/tls1.h>
#include <openssl/x509v3.h>

#include <ctime>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/config_check.h"
#include "common/files.h"
#include "common/status.h"

namespace custody::proxy {
namespace {

using custody::v1::ProxyTlsConfig;

// Forward-secret AEAD suites only (ECDHE, then AES-GCM / ChaCha20-Poly1305), in the order of
// Mozilla's "intermediate" server configuration: AES-128-GCM first. It is as safe as AES-256 for
// TLS (128-bit security, like the P-256 and X25519 key exchanges that protect it) and costs the
// relay about a quarter less cipher work per byte (10 AES rounds against 14).
constexpr char kDefaultCiphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";
constexpr char kDefaultCiphersuites[] =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
constexpr char kDefaultGroups[] = "X25519:P-256:P-384";
// One ticket per full handshake: enough for a client that reconnects (each resumption brings a
// new ticket); OpenSSL's default of two serves clients that open parallel connections, at a
// ticket's cost (an encrypted copy of the session) on every handshake.
constexpr uint32_t kDefaultSessionTickets = 1;
constexpr uint32_t kMaxSessionTickets = 8;

absl::StatusOr<int> ProtocolVersion(const std::string& field, const std::string& v) {
  if (v == "1.2") {
    return TLS1_2_VERSION;
  }
  if (v == "1.3") {
    return TLS1_3_VERSION;
  }
  return ConfigFieldError(field, absl::StrCat("'", v,
                                              "' is not offered: use \"1.2\" or \"1.3\" "
                                              "(SSLv3, TLS 1.0 and 1.1 are never enabled)"));
}

// AlpnWire encodes protocol names as RFC 7301 wants them: each prefixed with its length.
absl::StatusOr<std::vector<unsigned char>> AlpnWire(const std::string& field,
                                                    const ProxyTlsConfig& tls) {
  std::vector<unsigned char> wire;
  for (int i = 0; i < tls.alpn_size(); ++i) {
    const std::string& p = tls.alpn(i);
    if (p.empty() || p.size() > 255) {
      return ConfigFieldError(absl::StrCat(field, "[", i, "]"),
                              "an ALPN protocol name is 1 to 255 bytes (e.g. h2, http/1.1)");
    }
    wire.push_back(static_cast<unsigned char>(p.size()));
    wire.insert(wire.end(), p.begin(), p.end());
  }
  return wire;
}

// ApplyTlsSettings puts the listener's protocol settings on `ctx`. `prefix` names the config
// section in errors.
absl::Status ApplyTlsSettings(const std::string& prefix, const ProxyTlsConfig& tls, SSL_CTX* ctx) {
  CUSTODY_ASSIGN_OR_RETURN(int min, ProtocolVersion(prefix + ".min_version", tls.min_version()));
  CUSTODY_ASSIGN_OR_RETURN(int max, ProtocolVersion(prefix + ".max_version", tls.max_version()));
  if (min > max) {
    return ConfigFieldError(
        prefix + ".min_version",
        absl::StrCat("'", tls.min_version(), "' is above max_version '", tls.max_version(), "'"));
  }
  SSL_CTX_set_min_proto_version(ctx, min);
  SSL_CTX_set_max_proto_version(ctx, max);
  // The server picks the suite (ours are ordered strongest first); no renegotiation (a client
  // could make us sign again and again), no compression (CRIME); a peer that closes without
  // close_notify ends its direction like a TCP FIN does, as a TCP relay must.
  SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_RENEGOTIATION |
                               SSL_OP_NO_COMPRESSION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  // Read what the socket holds in one call, not a record header and then its body: the relay
  // checks SSL_has_pending, so bytes read ahead are never left waiting for an epoll event.
  SSL_CTX_set_read_ahead(ctx, 1);
  if (SSL_CTX_set_cipher_list(ctx, tls.ciphers().c_str()) != 1) {
    ClearOsslErrors();
    return ConfigFieldError(prefix + ".ciphers",
                            absl::StrCat("'", tls.ciphers(), "' names no cipher OpenSSL knows"));
  }
  if (SSL_CTX_set_ciphersuites(ctx, tls.ciphersuites().c_str()) != 1) {
    ClearOsslErrors();
    return ConfigFieldError(prefix + ".ciphersuites",
                            absl::StrCat("'", tls.ciphersuites(), "' is not a TLS 1.3 suite list"));
  }
  int tls12_suites = 0;
  STACK_OF(SSL_CIPHER)* ciphers = SSL_CTX_get_ciphers(ctx);
  for (int i = 0; i < sk_SSL_CIPHER_num(ciphers); ++i) {
    const SSL_CIPHER* c = sk_SSL_CIPHER_value(ciphers, i);
    const int kx = SSL_CIPHER_get_kx_nid(c);
    if (kx == NID_kx_any) {
      continue;  // A TLS 1.3 suite (key exchange is always ephemeral there).
    }
    if ((kx != NID_kx_ecdhe && kx != NID_kx_dhe) || SSL_CIPHER_is_aead(c) != 1 ||
        SSL_CIPHER_get_auth_nid(c) == NID_auth_null) {
      return ConfigFieldError(prefix + ".ciphers",
                              absl::StrCat("'", SSL_CIPHER_get_name(c),
                                           "' is not a forward-secret AEAD cipher; keep ECDHE "
                                           "with AES-GCM or ChaCha20-Poly1305 only"));
    }
    ++tls12_suites;
  }
  if (min <= TLS1_2_VERSION && tls12_suites == 0) {
    return ConfigFieldError(prefix + ".ciphers", "no TLS 1.2 cipher left; TLS 1.2 is enabled");
  }
  if (SSL_CTX_set1_groups_list(ctx, tls.groups().c_str()) != 1) {
    ClearOsslErrors();
    return ConfigFieldError(prefix + ".groups",
                            absl::StrCat("'", tls.groups(), "' is not a list of groups"));
  }
  // Partial writes and a buffer that moves between retries suit the relay's buffers; handshakes
  // run in ASYNC jobs so a signature never blocks the worker.
  SSL_CTX_set_mode(
      ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ASYNC);
  static const unsigned char kSessionContext[] = "custody-proxy";
  SSL_CTX_set_session_id_context(ctx, kSessionContext, sizeof(kSessionContext) - 1);
  // Resumption is by ticket only: the proxy keeps no per-client session state.
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  const uint32_t tickets =
      tls.has_session_tickets() ? tls.session_tickets() : kDefaultSessionTickets;
  SSL_CTX_set_num_tickets(ctx, tickets);
  if (tickets == 0) {
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<OsslPtr<X509>>> ParseChain(const std::string& pem,
                                                      const std::string& source) {
  OsslPtr<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::vector<OsslPtr<X509>> chain;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    chain.emplace_back(cert);
  }
  ClearOsslErrors();  // The loop ends on "no start line".
  if (chain.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(source, " holds no PEM certificate"));
  }
  return chain;
}

int64_t NotAfter(X509* cert) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1) {
    return 0;
  }
  return static_cast<int64_t>(timegm(&tm));
}

std::string Subject(X509* cert) {
  char buf[256];
  X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof(buf));
  return buf;
}

// LoadKeyReference loads the key-service key `uri` through the custody provider's store: an
// EVP_PKEY with the public half and a reference to the private half.
absl::StatusOr<OsslPtr<EVP_PKEY>> LoadKeyReference(const std::string& uri, OSSL_LIB_CTX* libctx) {
  ClearOsslErrors();
  OsslPtr<OSSL_STORE_CTX> store(OSSL_STORE_open_ex(uri.c_str(), libctx, nullptr, nullptr, nullptr,
                                                   nullptr, nullptr, nullptr));
  if (store == nullptr) {
    return OsslError(absl::StatusCode::kUnavailable, absl::StrCat("opening ", uri));
  }
  while (OSSL_STORE_eof(store.get()) != 1) {
    OsslPtr<OSSL_STORE_INFO> info(OSSL_STORE_load(store.get()));
    if (info == nullptr) {
      break;
    }
    if (OSSL_STORE_INFO_get_type(info.get()) == OSSL_STORE_INFO_PKEY) {
      return OsslPtr<EVP_PKEY>(OSSL_STORE_INFO_get1_PKEY(info.get()));
    }
  }
  return OsslError(absl::StatusCode::kUnavailable, absl::StrCat("loading ", uri));
}

}  // namespace

absl::Status CheckTlsSettings(const std::string& prefix, ProxyTlsConfig& tls) {
  if (tls.min_version().empty()) {
    tls.set_min_version("1.2");
  }
  if (tls.max_version().empty()) {
    tls.set_max_version("1.3");
  }
  if (tls.ciphers().empty()) {
    tls.set_ciphers(kDefaultCiphers);
  }
  if (tls.ciphersuites().empty()) {
    tls.set_ciphersuites(kDefaultCiphersuites);
  }
  if (tls.groups().empty()) {
    tls.set_groups(kDefaultGroups);
  }
  if (!tls.has_session_tickets()) {
    tls.set_session_tickets(kDefaultSessionTickets);
  } else if (tls.session_tickets() > kMaxSessionTickets) {
    return ConfigFieldError(
        prefix + ".session_tickets",
        absl::StrCat(tls.session_tickets(), " is above the maximum of ", kMaxSessionTickets));
  }
  for (int i = 0; i < tls.alpn_size(); ++i) {
    for (int j = 0; j < i; ++j) {
      if (tls.alpn(i) == tls.alpn(j)) {
        return ConfigFieldError(absl::StrCat(prefix, ".alpn[", i, "]"),
                                absl::StrCat("'", tls.alpn(i), "' is listed twice"));
      }
    }
  }
  CUSTODY_RETURN_IF_ERROR(AlpnWire(prefix + ".alpn", tls).status());
  OsslPtr<SSL_CTX> scratch(SSL_CTX_new(TLS_server_method()));
  if (scratch == nullptr) {
    return OsslError(absl::StatusCode::kInternal, "SSL_CTX_new");
  }
  return ApplyTlsSettings(prefix, tls, scratch.get());
}

absl::StatusOr<std::shared_ptr<const ListenerTls>> ListenerTls::Build(
    const custody::v1::ProxyListenerConfig& listener, OSSL_LIB_CTX* libctx,
    provider::KeySigner& signer, absl::Duration timeout) {
  std::shared_ptr<ListenerTls> out(new ListenerTls());
  const std::string prefix = absl::StrCat("listener '", listener.name(), "'");
  CUSTODY_ASSIGN_OR_RETURN(out->alpn_wire_, AlpnWire("tls.alpn", listener.tls()));
  for (const custody::v1::ProxyCertificate& cert : listener.certificates()) {
    const std::string what = absl::StrCat(prefix, ", key '", cert.key(), "'");
    std::string pem;
    std::string source;
    if (!cert.chain_file().empty()) {
      source = cert.chain_file();
      CUSTODY_ASSIGN_OR_RETURN(pem, ReadFile(cert.chain_file()));
    } else {
      source = absl::StrCat("the key service's chain of ", cert.key());
      auto key = signer.GetKey(cert.key(), absl::Now() + timeout);
      if (!key.ok()) {
        return absl::Status(key.status().code(),
                            absl::StrCat(what, ": fetching its chain: ", key.status().message()));
      }
      const uint32_t version = cert.version() != 0 ? cert.version() : key->active_version();
      for (const custody::v1::KeyVersion& v : key->versions()) {
        if (v.version() == version) {
          pem = v.certificate_chain_pem();
        }
      }
      if (pem.empty()) {
        return absl::FailedPreconditionError(
            absl::StrCat(what, ": the key service holds no certificate for version ", version,
                         "; import one into the token or set chain_file"));
      }
    }
    auto chain = ParseChain(pem, source);
    if (!chain.ok()) {
      return absl::Status(chain.status().code(),
                          absl::StrCat(what, ": ", chain.status().message()));
    }
    std::string uri = absl::StrCat("custody:key=", cert.key());
    if (cert.version() != 0) {
      absl::StrAppend(&uri, ";version=", cert.version());
    }
    auto pkey = LoadKeyReference(uri, libctx);
    if (!pkey.ok()) {
      return absl::Status(pkey.status().code(), absl::StrCat(what, ": ", pkey.status().message()));
    }

    OsslPtr<SSL_CTX> ctx(SSL_CTX_new_ex(libctx, nullptr, TLS_server_method()));
    if (ctx == nullptr) {
      return OsslError(absl::StatusCode::kInternal, "SSL_CTX_new_ex");
    }
    CUSTODY_RETURN_IF_ERROR(ApplyTlsSettings("tls", listener.tls(), ctx.get()));
    if (SSL_CTX_get_num_tickets(ctx.get()) > 0) {
      if (out->ticket_keys_ == nullptr) {
        out->ticket_keys_ = TicketKeys::ForListener(listener.name());
      }
      out->ticket_keys_->Install(ctx.get());
    }
    if (SSL_CTX_use_certificate(ctx.get(), (*chain)[0].get()) != 1) {
      return OsslError(absl::StatusCode::kFailedPrecondition,
                       absl::StrCat(what, ": using the leaf certificate of ", source));
    }
    for (size_t i = 1; i < chain->size(); ++i) {
      if (SSL_CTX_add1_chain_cert(ctx.get(), (*chain)[i].get()) != 1) {
        return OsslError(absl::StatusCode::kFailedPrecondition,
                         absl::StrCat(what, ": adding chain certificate ", i, " of ", source));
      }
    }
    if (SSL_CTX_use_PrivateKey(ctx.get(), pkey->get()) != 1 ||
        SSL_CTX_check_private_key(ctx.get()) != 1) {
      return OsslError(absl::StatusCode::kFailedPrecondition,
                       absl::StrCat(what, ": the leaf certificate of ", source,
                                    " does not carry this key's public half"));
    }
    SSL_CTX_set_tlsext_servername_callback(ctx.get(), &ListenerTls::OnServerName);
    SSL_CTX_set_tlsext_servername_arg(ctx.get(), out.get());
    if (!out->alpn_wire_.empty()) {
      SSL_CTX_set_alpn_select_cb(
          ctx.get(),
          [](SSL*, const unsigned char** selected, unsigned char* selected_len,
             const unsigned char* in, unsigned int in_len, void* arg) -> int {
            const auto* self = static_cast<const ListenerTls*>(arg);
            unsigned char* sel = nullptr;
            // Server preference: the first of our protocols the client offers.
            if (SSL_select_next_proto(&sel, selected_len, self->alpn_wire_.data(),
                                      static_cast<unsigned int>(self->alpn_wire_.size()), in,
                                      in_len) != OPENSSL_NPN_NEGOTIATED) {
              return SSL_TLSEXT_ERR_ALERT_FATAL;  // no_application_protocol, RFC 7301 3.2.
            }
            *selected = sel;
            return SSL_TLSEXT_ERR_OK;
          },
          out.get());
    }

    ServedCertificate served;
    served.key = cert.key();
    served.version = cert.version();
    served.subject = Subject((*chain)[0].get());
    served.not_after = NotAfter((*chain)[0].get());
    served.is_default = cert.default_();
    for (const std::string& name : cert.server_names()) {
      served.server_names.push_back(name);
      out->by_name_[name] = ctx.get();
    }
    if (cert.default_()) {
      out->default_ = ctx.get();
    }
    out->served_.push_back(std::move(served));
    out->contexts_.push_back(std::move(ctx));
  }
  if (out->default_ == nullptr) {
    out->default_ = out->contexts_.front().get();
  }
  return std::shared_ptr<const ListenerTls>(std::move(out));
}

OsslPtr<SSL> ListenerTls::NewSsl() const {
  OsslPtr<SSL> ssl(SSL_new(default_));
  if (ssl != nullptr) {
    SSL_set_accept_state(ssl.get());
  }
  return ssl;
}

SSL_CTX* ListenerTls::ContextFor(std::string_view server_name) const {
  std::string name = absl::AsciiStrToLower(std::string(server_name));
  if (auto it = by_name_.find(name); it != by_name_.end()) {
    return it->second;
  }
  if (const auto dot = name.find('.'); dot != std::string::npos) {
    if (auto it = by_name_.find(absl::StrCat("*", name.substr(dot))); it != by_name_.end()) {
      return it->second;
    }
  }
  return nullptr;
}

int ListenerTls::OnServerName(SSL* ssl, int* /*alert*/, void* arg) {
  const auto* self = static_cast<const ListenerTls*>(arg);
  const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  if (name == nullptr) {
    return SSL_TLSEXT_ERR_NOACK;  // No SNI: the default certificate.
  }
  SSL_CTX* ctx = self->ContextFor(name);
  if (ctx != nullptr && ctx != SSL_get_SSL_CTX(ssl)) {
    SSL_set_SSL_CTX(ssl, ctx);
  }
  // An unknown name gets the default certificate, as most servers do; the client decides.
  return SSL_TLSEXT_ERR_OK;
}

}  // namespace custody::proxy

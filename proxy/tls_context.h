// Server-side TLS for one listener: one SSL_CTX per certificate, chosen by SNI, each with the
// listener's protocol settings and a private key that is a reference to a key in the key service
// (loaded through the custody provider's store, "custody:key=NAME"). Immutable once built; a
// reload builds a new one.
#pragma once

#include <openssl/ssl.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/ossl.h"
#include "custody/v1/proxy_config.pb.h"
#include "proxy/provider/key_signer.h"
#include "proxy/ticket_keys.h"

namespace custody::proxy {

// CheckTlsSettings fills the defaults of `tls` and tries them on a scratch context: versions,
// ciphers (forward-secret AEAD only), TLS 1.3 suites, groups, ALPN. INVALID_ARGUMENT names the
// field under `prefix`.
[[nodiscard]] absl::Status CheckTlsSettings(const std::string& prefix,
                                            custody::v1::ProxyTlsConfig& tls);

// ServedCertificate describes one certificate a listener serves (for logs and metrics).
struct ServedCertificate {
  std::string key;        // Key-service key name.
  uint32_t version = 0;   // 0: the active version.
  std::string subject;    // Leaf subject, one line.
  int64_t not_after = 0;  // Leaf notAfter, seconds since the epoch.
  std::vector<std::string> server_names;
  bool is_default = false;
};

// ListenerTls selects a certificate by SNI. Thread-safe after construction (read-only).
class ListenerTls {
 public:
  // Build makes every certificate's context: the chain from chain_file or from the key service
  // (GetKey), the private key by reference from the custody provider in `libctx`. Every context
  // is checked (the leaf carries the key's public half) before Build returns.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const ListenerTls>> Build(
      const custody::v1::ProxyListenerConfig& listener, OSSL_LIB_CTX* libctx,
      provider::KeySigner& signer, absl::Duration timeout);

  // NewSsl makes a connection object on the default context; the SNI callback switches it to
  // the certificate asked for. The caller must keep this ListenerTls alive until the handshake
  // is over.
  [[nodiscard]] OsslPtr<SSL> NewSsl() const;

  const std::vector<ServedCertificate>& certificates() const { return served_; }

  // ContextFor returns the context serving `server_name` (exact, then "*.parent"), or null.
  SSL_CTX* ContextFor(std::string_view server_name) const;

 private:
  ListenerTls() = default;
  static int OnServerName(SSL* ssl, int* alert, void* arg);

  std::vector<OsslPtr<SSL_CTX>> contexts_;
  SSL_CTX* default_ = nullptr;
  std::unordered_map<std::string, SSL_CTX*> by_name_;  // Lower-case name or "*.parent".
  std::vector<ServedCertificate> served_;
  std::vector<unsigned char> alpn_wire_;     // ALPN list in wire format (length-prefixed).
  std::shared_ptr<TicketKeys> ticket_keys_;  // Null when the listener issues no tickets.
};

}  // namespace custody::proxy

// TicketKeys: the keys that protect a listener's session tickets (AES-256-CBC + HMAC-SHA256, as
// OpenSSL's own), made in the proxy's memory and rotated: each key encrypts new tickets for
// kEncryptFor, then only opens tickets for kDecryptFor more (the ticket lifetime the proxy
// announces), and is then wiped. A ticket opened with an older key is accepted and replaced by
// one under the current key. So a key taken from the proxy's memory opens at most the tickets
// of the last few hours, not every ticket since the process started (OpenSSL's default: one
// random key per context, for the context's life). A listener keeps its keys across config
// reloads (keys are found by listener name), so clients resume across a SIGHUP.
#pragma once

#include <openssl/ssl.h>

#include <array>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace custody::proxy {

class TicketKeys {
 public:
  static constexpr absl::Duration kEncryptFor = absl::Hours(1);
  static constexpr absl::Duration kDecryptFor = absl::Hours(2);
  static constexpr size_t kNameBytes = 16;

  // ForListener returns the key ring of listener `name`, made on first use and kept for the
  // process's life.
  static std::shared_ptr<TicketKeys> ForListener(const std::string& name);

  explicit TicketKeys(std::function<absl::Time()> now = [] { return absl::Now(); });
  ~TicketKeys();
  TicketKeys(const TicketKeys&) = delete;
  TicketKeys& operator=(const TicketKeys&) = delete;

  // Install makes `ctx` protect its tickets with these keys (which must outlive it) and
  // announce a ticket lifetime of kDecryptFor.
  void Install(SSL_CTX* ctx);

  // Use is OpenSSL's ticket key callback (SSL_CTX_set_tlsext_ticket_key_evp_cb) for this ring:
  // enc=1 names the current key in `name`, draws `iv` and sets up `cipher` and `mac` to seal a
  // ticket (returns 1); enc=0 finds the key `name` names and sets them up to open one: 1 with
  // the current key, 2 with an older one (renew the ticket), 0 if no key of that name is held
  // (full handshake), -1 on error.
  int Use(unsigned char name[kNameBytes], unsigned char iv[EVP_MAX_IV_LENGTH],
          EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac, int enc);

  // Held counts the keys held now (for tests).
  size_t Held();

 private:
  struct Key {
    std::array<unsigned char, kNameBytes> name;
    std::array<unsigned char, 32> aes;
    std::array<unsigned char, 32> hmac;
    absl::Time made;
  };
  // CurrentLocked rotates if the newest key is past kEncryptFor (or there is none), drops the
  // keys past kEncryptFor + kDecryptFor, and returns the newest; null if no key can be made.
  const Key* CurrentLocked(absl::Time now);

  const std::function<absl::Time()> now_;
  std::mutex mu_;         // Guards keys_.
  std::deque<Key> keys_;  // Newest first.
};

}  // namespace custody::proxy

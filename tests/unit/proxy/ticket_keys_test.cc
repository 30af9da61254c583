#include "proxy/ticket_keys.h"

#include <gtest/gtest.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>

#include <array>
#include <cstring>

#include "common/ossl.h"

namespace custody::proxy {
namespace {

using Name = std::array<unsigned char, TicketKeys::kNameBytes>;

// Contexts for one call of TicketKeys::Use, as OpenSSL would pass them.
struct Call {
  Call()
      : cipher(EVP_CIPHER_CTX_new()),
        mac_alg(EVP_MAC_fetch(nullptr, "HMAC", nullptr)),
        mac(EVP_MAC_CTX_new(mac_alg.get())) {}
  OsslPtr<EVP_CIPHER_CTX> cipher;
  OsslPtr<EVP_MAC> mac_alg;
  OsslPtr<EVP_MAC_CTX> mac;
  std::array<unsigned char, EVP_MAX_IV_LENGTH> iv{};
};

// Crypt runs `in` through the cipher Use set up on `call` (sealing or opening, as Use was told).
std::string Crypt(Call& call, const std::string& in) {
  std::string out(in.size() + EVP_MAX_BLOCK_LENGTH, '\0');
  auto* dst = reinterpret_cast<unsigned char*>(out.data());
  int n = 0;
  int m = 0;
  EXPECT_EQ(EVP_CipherUpdate(call.cipher.get(), dst, &n,
                             reinterpret_cast<const unsigned char*>(in.data()),
                             static_cast<int>(in.size())),
            1);
  EXPECT_EQ(EVP_CipherFinal_ex(call.cipher.get(), dst + n, &m), 1);
  out.resize(static_cast<size_t>(n + m));
  return out;
}

// Seal encrypts `plain` as a ticket would be; returns the key name used.
Name Seal(TicketKeys& keys, const std::string& plain, std::string* sealed, Call& call) {
  Name name{};
  EXPECT_EQ(keys.Use(name.data(), call.iv.data(), call.cipher.get(), call.mac.get(), 1), 1);
  *sealed = Crypt(call, plain);
  return name;
}

// Open decrypts `sealed` with the key `name` names; returns Use's answer, and the plaintext.
int Open(TicketKeys& keys, Name name, const std::array<unsigned char, EVP_MAX_IV_LENGTH>& iv,
         const std::string& sealed, std::string* plain) {
  Call call;
  call.iv = iv;
  const int r = keys.Use(name.data(), call.iv.data(), call.cipher.get(), call.mac.get(), 0);
  if (r > 0) {
    *plain = Crypt(call, sealed);
  }
  return r;
}

TEST(TicketKeysTest, KeysRotateAndExpire) {
  absl::Time now = absl::FromUnixSeconds(1'800'000'000);
  TicketKeys keys([&] { return now; });

  Call first;
  std::string sealed_a;
  const Name a = Seal(keys, "session A", &sealed_a, first);
  std::string plain;
  EXPECT_EQ(Open(keys, a, first.iv, sealed_a, &plain), 1) << "the current key opens it";
  EXPECT_EQ(plain, "session A");
  EXPECT_EQ(keys.Held(), 1u);

  // Within kEncryptFor, the same key seals.
  now += TicketKeys::kEncryptFor - absl::Seconds(1);
  Call again;
  std::string ignored;
  EXPECT_EQ(Seal(keys, "x", &ignored, again), a);

  // Past kEncryptFor, a new key seals; the old one still opens, asking for a renewal (2).
  now += absl::Seconds(2);
  Call second;
  std::string sealed_b;
  const Name b = Seal(keys, "session B", &sealed_b, second);
  EXPECT_NE(b, a);
  EXPECT_EQ(keys.Held(), 2u);
  EXPECT_EQ(Open(keys, a, first.iv, sealed_a, &plain), 2);
  EXPECT_EQ(plain, "session A");
  EXPECT_EQ(Open(keys, b, second.iv, sealed_b, &plain), 1);
  EXPECT_EQ(plain, "session B");

  // A name this ring never made: a full handshake (0), not an error.
  Name stranger{};
  stranger.fill(0x5a);
  EXPECT_EQ(Open(keys, stranger, first.iv, sealed_a, &plain), 0);

  // kEncryptFor + kDecryptFor after it was made, key A is wiped: its tickets are refused.
  now = absl::FromUnixSeconds(1'800'000'000) + TicketKeys::kEncryptFor + TicketKeys::kDecryptFor;
  EXPECT_EQ(Open(keys, a, first.iv, sealed_a, &plain), 0);
  EXPECT_EQ(Open(keys, b, second.iv, sealed_b, &plain), 2) << "B is older than the newest now";
  EXPECT_LE(keys.Held(), 2u);
}

TEST(TicketKeysTest, AListenerKeepsItsRingAcrossReloads) {
  auto one = TicketKeys::ForListener("ticket-test-a");
  EXPECT_EQ(TicketKeys::ForListener("ticket-test-a"), one);
  EXPECT_NE(TicketKeys::ForListener("ticket-test-b"), one);
}

}  // namespace
}  // namespace custody::proxy

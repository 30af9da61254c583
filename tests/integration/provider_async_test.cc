// Handshake signatures in OpenSSL ASYNC jobs: many TLS handshakes on ONE thread, each paused
// while the key service signs, all completing. The thread never waits for a signature; it drives
// every connection until its job's wait fd says the answer is in.
#include <gtest/gtest.h>
#include <openssl/async.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>
#include <openssl/store.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <vector>

#include "common/files.h"
#include "common/ossl.h"
#include "tests/support/keyd_process.h"
#include "tests/support/lab.h"

extern "C" int OSSL_provider_init(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in,
                                  const OSSL_DISPATCH** out, void** provctx);

namespace custody {
namespace {

struct Pair {
  SSL* server = nullptr;
  SSL* client = nullptr;
  bool server_done = false;
  bool client_done = false;
  bool paused = false;  // The server's last step ended in SSL_ERROR_WANT_ASYNC.
};

TEST(ProviderAsyncTest, ManyHandshakesPauseOnOneThreadAndAllComplete) {
  auto lab = testing::Lab::Create();
  ASSERT_TRUE(lab.ok()) << lab.status();
  ::setenv("CUSTODY_IDENTITY", "proxy", 1);
  auto keyd = testing::KeydProcess::Start({"--config", (*lab)->Env("CUSTODY_KEYD_CONFIG")},
                                          (*lab)->Path("keyd.log"));
  ASSERT_TRUE(keyd.ok()) << keyd.status();
  const auto audit_before = ReadFile((*lab)->Env("CUSTODY_AUDIT_LOG"))->size();

  OSSL_LIB_CTX* libctx = OSSL_LIB_CTX_new();
  ASSERT_EQ(OSSL_PROVIDER_add_builtin(libctx, "custody", OSSL_provider_init), 1);
  OSSL_PROVIDER* def = OSSL_PROVIDER_load(libctx, "default");
  OSSL_PROVIDER* custody = OSSL_PROVIDER_load(libctx, "custody");
  ASSERT_TRUE(def != nullptr && custody != nullptr);

  OSSL_STORE_CTX* store = OSSL_STORE_open_ex("custody:key=lab-ec256", libctx, nullptr, nullptr,
                                             nullptr, nullptr, nullptr, nullptr);
  ASSERT_NE(store, nullptr);
  OSSL_STORE_INFO* info = OSSL_STORE_load(store);
  ASSERT_NE(info, nullptr);
  OsslPtr<EVP_PKEY> key(OSSL_STORE_INFO_get1_PKEY(info));
  OSSL_STORE_INFO_free(info);
  OSSL_STORE_close(store);
  ASSERT_NE(key, nullptr);

  SSL_CTX* server_ctx = SSL_CTX_new_ex(libctx, nullptr, TLS_server_method());
  ASSERT_EQ(
      SSL_CTX_use_certificate_chain_file(server_ctx, (*lab)->Path("certs/lab-ec256.crt").c_str()),
      1);
  ASSERT_EQ(SSL_CTX_use_PrivateKey(server_ctx, key.get()), 1);
  SSL_CTX_set_mode(server_ctx, SSL_MODE_ASYNC);
  SSL_CTX_set_min_proto_version(server_ctx, TLS1_3_VERSION);
  SSL_CTX* client_ctx = SSL_CTX_new(TLS_client_method());
  ASSERT_EQ(SSL_CTX_load_verify_locations(client_ctx, (*lab)->Env("CUSTODY_CA").c_str(), nullptr),
            1);
  SSL_CTX_set_verify(client_ctx, SSL_VERIFY_PEER, nullptr);

  constexpr int kHandshakes = 24;
  std::vector<Pair> pairs(kHandshakes);
  for (Pair& p : pairs) {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds), 0);
    p.server = SSL_new(server_ctx);
    p.client = SSL_new(client_ctx);
    SSL_set_fd(p.server, fds[0]);
    SSL_set_fd(p.client, fds[1]);
    SSL_set_accept_state(p.server);
    SSL_set_connect_state(p.client);
    SSL_set1_host(p.client, "localhost");
  }

  int max_paused = 0;
  int async_waits = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  int done = 0;
  while (done < kHandshakes && absl::Now() < give_up) {
    std::vector<pollfd> wait;
    for (Pair& p : pairs) {
      if (!p.client_done) {
        const int rc = SSL_do_handshake(p.client);
        p.client_done = rc == 1;
        ASSERT_TRUE(rc == 1 || SSL_get_error(p.client, rc) == SSL_ERROR_WANT_READ ||
                    SSL_get_error(p.client, rc) == SSL_ERROR_WANT_WRITE);
      }
      if (!p.server_done) {
        const int rc = SSL_do_handshake(p.server);
        const int err = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(p.server, rc);
        p.server_done = rc == 1;
        ASSERT_TRUE(rc == 1 || err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE ||
                    err == SSL_ERROR_WANT_ASYNC)
            << "server handshake error " << err;
        p.paused = err == SSL_ERROR_WANT_ASYNC;
        if (p.paused) {
          ++async_waits;
          std::size_t n = 0;
          SSL_get_all_async_fds(p.server, nullptr, &n);
          std::vector<OSSL_ASYNC_FD> fds(n);
          SSL_get_all_async_fds(p.server, fds.data(), &n);
          for (OSSL_ASYNC_FD fd : fds) {
            wait.push_back({fd, POLLIN, 0});
          }
        }
      }
    }
    int paused_now = 0;
    done = 0;
    for (const Pair& p : pairs) {
      paused_now += p.paused ? 1 : 0;
      done += p.server_done && p.client_done ? 1 : 0;
    }
    max_paused = std::max(max_paused, paused_now);
    if (!wait.empty() && paused_now == static_cast<int>(kHandshakes - done)) {
      // Everything left waits on the key service: sleep in poll, as an event loop would.
      ::poll(wait.data(), wait.size(), 100);
    }
  }
  EXPECT_EQ(done, kHandshakes);
  // Most handshakes pause (one whose answer is already in when it checks, e.g. because the
  // thread was preempted right after queueing, finishes without pausing), and many wait at the
  // same time: the thread was never stuck on one signature.
  EXPECT_GE(max_paused, kHandshakes / 2) << "the handshakes did not wait concurrently";
  EXPECT_GE(async_waits, kHandshakes / 2);
  for (Pair& p : pairs) {
    EXPECT_EQ(SSL_get_verify_result(p.client), X509_V_OK);
    const int fds[2] = {SSL_get_fd(p.server), SSL_get_fd(p.client)};
    SSL_free(p.server);
    SSL_free(p.client);
    ::close(fds[0]);
    ::close(fds[1]);
  }
  // One audit record per handshake signature.
  const std::string audit = ReadFile((*lab)->Env("CUSTODY_AUDIT_LOG"))->substr(audit_before);
  EXPECT_EQ(std::count(audit.begin(), audit.end(), '\n'), kHandshakes);
  SSL_CTX_free(server_ctx);
  SSL_CTX_free(client_ctx);
  key.reset();
  OSSL_PROVIDER_unload(custody);
  OSSL_PROVIDER_unload(def);
  OSSL_LIB_CTX_free(libctx);
}

}  // namespace
}  // namespace custody

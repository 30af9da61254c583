// custody-bench-tls: TLS load for bench/proxy.sh, the same client against custody-proxy and its
// peers (nginx). Modes:
//   handshake  C threads, each looping: connect, a full TLS handshake (tickets and the session
//              cache off, so nothing is resumed; resumed handshakes are counted and must be 0),
//              one small request, read the answer to its end; for --seconds.
//   latency    one keep-alive connection, --requests small requests one after another; p50/p99.
//   bulk       C connections at once, each "GET /bytes/N"; total MB/s.
// Prints one line of key=value results.
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string mode = "handshake";
  std::string connect;
  std::string sni = "ec256.lab.test";
  std::string ca;
  std::string tls = "1.3";
  int concurrency = 1;
  double seconds = 5;
  int requests = 2000;
  uint64_t bytes = 1 << 20;
  bool plain = false;   // latency/bulk without TLS (the backend directly).
  std::string samples;  // latency: append every sample (us, one per line) to this file.
};

int Connect(const std::string& addr) {
  const auto colon = addr.rfind(':');
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(addr.substr(0, colon).c_str(), addr.substr(colon + 1).c_str(), &hints, &res) !=
      0) {
    return -1;
  }
  const int fd = ::socket(res->ai_family, SOCK_STREAM, 0);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval tv{30, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (::connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
    ::close(fd);
    freeaddrinfo(res);
    return -1;
  }
  freeaddrinfo(res);
  return fd;
}

// Conn is one client connection, TLS or plain.
struct Conn {
  int fd = -1;
  SSL* ssl = nullptr;
  ~Conn() {
    if (ssl != nullptr) {
      SSL_free(ssl);
    }
    if (fd >= 0) {
      ::close(fd);
    }
  }
  bool Open(const Options& o, SSL_CTX* ctx) {
    fd = Connect(o.connect);
    if (fd < 0) {
      return false;
    }
    if (o.plain) {
      return true;
    }
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, o.sni.c_str());
    SSL_set1_host(ssl, o.sni.c_str());
    return SSL_connect(ssl) == 1;
  }
  int Write(const char* p, int n) { return ssl ? SSL_write(ssl, p, n) : ::send(fd, p, n, 0); }
  int Read(char* p, int n) { return ssl ? SSL_read(ssl, p, n) : ::recv(fd, p, n, 0); }
};

// ReadResponse reads one HTTP response with a Content-Length; returns body bytes or -1.
int64_t ReadResponse(Conn& c, std::string& buf) {
  char tmp[65536];
  size_t end;
  while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
    const int n = c.Read(tmp, sizeof(tmp));
    if (n <= 0) {
      return -1;
    }
    buf.append(tmp, n);
  }
  const size_t cl = buf.find("Content-Length: ");
  const uint64_t len = cl < end ? std::stoull(buf.substr(cl + 16)) : 0;
  uint64_t have = buf.size() - end - 4;
  while (have < len) {
    const int n = c.Read(tmp, static_cast<int>(std::min<uint64_t>(sizeof(tmp), len - have)));
    if (n <= 0) {
      return -1;
    }
    have += static_cast<uint64_t>(n);
  }
  buf.erase(0, std::min<size_t>(buf.size(), end + 4 + len));
  return static_cast<int64_t>(len);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"custody-bench-tls: TLS handshake, latency and bulk load"};
  app.add_option("mode", o.mode, "handshake, latency or bulk")
      ->check(CLI::IsMember({"handshake", "latency", "bulk"}));
  app.add_option("--connect", o.connect, "host:port")->required();
  app.add_option("--sni", o.sni, "server name (also checked against the certificate)");
  app.add_option("--ca", o.ca, "CA file");
  app.add_option("--tls", o.tls, "1.3 or 1.2")->check(CLI::IsMember({"1.2", "1.3"}));
  app.add_option("-c,--concurrency", o.concurrency, "connections at once");
  app.add_option("--seconds", o.seconds, "handshake mode: how long");
  app.add_option("--requests", o.requests, "latency mode: requests");
  app.add_option("--bytes", o.bytes, "bulk mode: bytes per connection");
  app.add_flag("--plain", o.plain, "no TLS (the backend directly)");
  app.add_option("--samples", o.samples,
                 "latency mode: append every request's time (us, one per line) to this file");
  CLI11_PARSE(app, argc, argv);

  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  const int v = o.tls == "1.3" ? TLS1_3_VERSION : TLS1_2_VERSION;
  SSL_CTX_set_min_proto_version(ctx, v);
  SSL_CTX_set_max_proto_version(ctx, v);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  if (!o.ca.empty()) {
    SSL_CTX_load_verify_locations(ctx, o.ca.c_str(), nullptr);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  }
  const std::string request = "GET /bench HTTP/1.1\r\nHost: " + o.sni + "\r\n\r\n";

  if (o.mode == "handshake") {
    std::atomic<uint64_t> done{0}, resumed{0}, errors{0};
    const auto stop = Clock::now() + std::chrono::duration<double>(o.seconds);
    const auto start = Clock::now();
    std::vector<std::thread> threads;
    for (int t = 0; t < o.concurrency; ++t) {
      threads.emplace_back([&] {
        std::string buf;
        while (Clock::now() < stop) {
          Conn c;
          buf.clear();
          if (!c.Open(o, ctx) || c.Write(request.data(), static_cast<int>(request.size())) <= 0 ||
              ReadResponse(c, buf) < 0) {
            errors.fetch_add(1);
            ERR_clear_error();
            continue;
          }
          if (c.ssl != nullptr && SSL_session_reused(c.ssl)) {
            resumed.fetch_add(1);
          }
          if (c.ssl != nullptr) {
            SSL_shutdown(c.ssl);
          }
          done.fetch_add(1);
        }
      });
    }
    for (auto& t : threads) {
      t.join();
    }
    const double secs = std::chrono::duration<double>(Clock::now() - start).count();
    std::printf("handshakes=%llu resumed=%llu errors=%llu seconds=%.3f rate=%.1f\n",
                static_cast<unsigned long long>(done.load()),
                static_cast<unsigned long long>(resumed.load()),
                static_cast<unsigned long long>(errors.load()), secs, done.load() / secs);
    return errors.load() > done.load() / 100 ? 1 : 0;
  }

  if (o.mode == "latency") {
    Conn c;
    if (!c.Open(o, ctx)) {
      std::fprintf(stderr, "cannot connect\n");
      return 1;
    }
    std::string buf;
    std::vector<double> us;
    for (int i = 0; i < o.requests + 100; ++i) {
      const auto t0 = Clock::now();
      if (c.Write(request.data(), static_cast<int>(request.size())) <= 0 ||
          ReadResponse(c, buf) < 0) {
        std::fprintf(stderr, "request failed\n");
        return 1;
      }
      if (i >= 100) {  // Warm-up excluded.
        us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
    }
    if (!o.samples.empty()) {
      std::FILE* f = std::fopen(o.samples.c_str(), "a");
      if (f == nullptr) {
        std::fprintf(stderr, "cannot open %s\n", o.samples.c_str());
        return 1;
      }
      for (const double u : us) {
        std::fprintf(f, "%.1f\n", u);
      }
      std::fclose(f);
    }
    std::sort(us.begin(), us.end());
    std::printf("requests=%zu p50_us=%.1f p99_us=%.1f\n", us.size(), us[us.size() / 2],
                us[us.size() * 99 / 100]);
    return 0;
  }

  // bulk
  std::atomic<uint64_t> total{0}, errors{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < o.concurrency; ++t) {
    threads.emplace_back([&] {
      Conn c;
      std::string buf;
      const std::string get =
          "GET /bytes/" + std::to_string(o.bytes) + " HTTP/1.1\r\nHost: " + o.sni + "\r\n\r\n";
      int64_t n = -1;
      if (c.Open(o, ctx) && c.Write(get.data(), static_cast<int>(get.size())) > 0) {
        n = ReadResponse(c, buf);
      }
      if (n != static_cast<int64_t>(o.bytes)) {
        errors.fetch_add(1);
      } else {
        total.fetch_add(static_cast<uint64_t>(n));
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("bytes=%llu errors=%llu seconds=%.3f mb_per_s=%.1f\n",
              static_cast<unsigned long long>(total.load()),
              static_cast<unsigned long long>(errors.load()), secs, total.load() / secs / 1e6);
  return errors.load() == 0 ? 0 : 1;
}

// custody-lab-backend: a small plaintext backend for the lab, the demo, the tests and the
// benchmarks. One thread, epoll, non-blocking.
//   --mode http  HTTP/1.1 with keep-alive: "GET /bytes/N" answers N bytes, anything else a
//                short text naming the method and path. Request bodies (Content-Length) are read
//                and discarded.
//   --mode echo  every byte comes back; the client's end (FIN) is passed back once all is sent.
//   --proxy-protocol  every connection starts with a PROXY protocol header (v1 or v2, as
//                custody-proxy's backend.proxy_protocol sends); http mode names the client it
//                gives in each answer. A connection without a valid header is closed.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/config_check.h"
#include "common/unique_fd.h"

namespace {

constexpr size_t kChunk = 64 * 1024;

struct Conn {
  custody::UniqueFd fd;
  std::string in;   // Bytes received, not yet handled.
  std::string out;  // Bytes to send.
  size_t out_off = 0;
  uint64_t body_left = 0;     // Generated body bytes still to send (/bytes/N).
  uint64_t discard_left = 0;  // Request body bytes still to discard.
  bool peer_eof = false;
  bool shut_wr = false;
  bool awaiting_proxy_header = false;
  std::string client;  // From the PROXY header: "ip:port", "[ip6]:port", "unknown" or "local".
};

bool echo_mode = false;

// ParseProxyHeader takes a PROXY protocol header off the front of `in` into `client`: 1 when
// done, 0 when more bytes are needed, -1 when `in` does not start with a valid header.
int ParseProxyHeader(std::string& in, std::string* client) {
  static const std::string kV2Sig("\r\n\r\n\0\r\nQUIT\n", 12);
  if (absl::StartsWith(in, "PROXY ")) {
    const size_t eol = in.find("\r\n");
    if (eol == std::string::npos) {
      return in.size() > 107 ? -1 : 0;
    }
    const std::vector<std::string> f = absl::StrSplit(in.substr(6, eol - 6), ' ');
    if (f.size() >= 1 && f[0] == "UNKNOWN") {
      *client = "unknown";
    } else if (f.size() == 5 && (f[0] == "TCP4" || f[0] == "TCP6")) {
      *client =
          f[0] == "TCP4" ? absl::StrCat(f[1], ":", f[3]) : absl::StrCat("[", f[1], "]:", f[3]);
    } else {
      return -1;
    }
    in.erase(0, eol + 2);
    return 1;
  }
  if (in.size() < 16) {
    // More is needed while what came may still begin either header.
    const bool may_be_v1 = absl::StartsWith("PROXY ", in);
    const bool may_be_v2 = absl::StartsWith(kV2Sig, absl::string_view(in).substr(0, 12));
    return may_be_v1 || may_be_v2 ? 0 : -1;
  }
  if (!absl::StartsWith(in, kV2Sig)) {
    return -1;
  }
  const auto* h = reinterpret_cast<const unsigned char*>(in.data());
  const size_t len = (size_t{h[14]} << 8) | h[15];
  if (in.size() < 16 + len) {
    return 0;
  }
  const unsigned char* a = h + 16;
  char ip[INET6_ADDRSTRLEN] = {};
  if (h[12] == 0x20) {
    *client = "local";
  } else if (h[12] == 0x21 && h[13] == 0x11 && len >= 12) {
    ::inet_ntop(AF_INET, a, ip, sizeof(ip));
    *client = absl::StrCat(ip, ":", (a[8] << 8) | a[9]);
  } else if (h[12] == 0x21 && h[13] == 0x21 && len >= 36) {
    ::inet_ntop(AF_INET6, a, ip, sizeof(ip));
    *client = absl::StrCat("[", ip, "]:", (a[32] << 8) | a[33]);
  } else {
    return -1;
  }
  in.erase(0, 16 + len);
  return 1;
}

// HandleHttp turns complete requests in `c.in` into responses in `c.out`.
void HandleHttp(Conn& c) {
  for (;;) {
    if (c.discard_left > 0) {
      const size_t n = std::min<uint64_t>(c.discard_left, c.in.size());
      c.in.erase(0, n);
      c.discard_left -= n;
      if (c.discard_left > 0) {
        return;
      }
    }
    if (c.body_left > 0 || c.peer_eof) {
      return;  // Finish this response first (pipelining), or the connection is closing.
    }
    const size_t end = c.in.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (c.in.size() > 64 * 1024) {
        c.out += "HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n";
        c.peer_eof = true;
      }
      return;
    }
    const std::string head = c.in.substr(0, end);
    c.in.erase(0, end + 4);
    const size_t sp1 = head.find(' ');
    const size_t sp2 = head.find(' ', sp1 + 1);
    const std::string method = head.substr(0, sp1);
    const std::string path = sp1 == std::string::npos ? "" : head.substr(sp1 + 1, sp2 - sp1 - 1);
    const size_t cl = head.find("\r\nContent-Length: ");
    if (cl != std::string::npos) {
      uint64_t len = 0;
      const size_t eol = head.find("\r\n", cl + 2);
      (void)absl::SimpleAtoi(head.substr(cl + 18, eol - cl - 18), &len);
      c.discard_left = len;
    }
    // HTTP/1.0 without keep-alive, or "Connection: close": answer, then close.
    const bool close_after =
        head.find("\r\nConnection: close") != std::string::npos ||
        (head.substr(0, head.find("\r\n")).find("HTTP/1.0") != std::string::npos &&
         head.find("\r\nConnection: keep-alive") == std::string::npos);
    if (close_after) {
      c.peer_eof = true;  // Read no more; the end is passed on once the answer is sent.
    }
    uint64_t n = 0;
    if (path.rfind("/bytes/", 0) == 0 && absl::SimpleAtoi(path.substr(7), &n)) {
      absl::StrAppend(&c.out, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n",
                      "Content-Length: ", n, "\r\n\r\n");
      c.body_left = n;
    } else {
      const std::string body =
          absl::StrCat("hello from the custody lab backend: ", method, " ", path,
                       c.client.empty() ? "" : absl::StrCat(" (client ", c.client, ")"), "\n");
      if (close_after) {
        c.out += "HTTP/1.1 200 OK\r\nConnection: close\r\n";
        absl::StrAppend(&c.out, "Content-Type: text/plain\r\nContent-Length: ", body.size(),
                        "\r\n\r\n", body);
        return;
      }
      absl::StrAppend(&c.out, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ",
                      body.size(), "\r\n\r\n", body);
    }
  }
}

// Flush sends what is queued (and generated body bytes); false when the peer is gone.
bool Flush(Conn& c) {
  static const std::string zeros(kChunk, 'x');
  for (;;) {
    if (c.out_off == c.out.size()) {
      c.out.clear();
      c.out_off = 0;
      if (c.body_left == 0) {
        return true;
      }
      const size_t n = std::min<uint64_t>(c.body_left, kChunk);
      c.out.assign(zeros, 0, n);
      c.body_left -= n;
    }
    const ssize_t n =
        ::send(c.fd.get(), c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
    if (n < 0) {
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    c.out_off += static_cast<size_t>(n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"custody-lab-backend: a plaintext HTTP or echo backend for the custody lab"};
  std::string listen;
  std::string mode = "http";
  bool proxy_protocol = false;
  app.add_option("--listen", listen, "host:port to listen on")->required();
  app.add_flag("--proxy-protocol", proxy_protocol,
               "expect a PROXY protocol header (v1 or v2) at the start of every connection");
  app.add_option("--mode", mode, "http or echo")->check(CLI::IsMember({"http", "echo"}));
  CLI11_PARSE(app, argc, argv);
  echo_mode = mode == "echo";
  signal(SIGPIPE, SIG_IGN);

  auto hp = custody::ParseHostPort(listen);
  if (!hp.ok()) {
    std::fprintf(stderr, "custody-lab-backend: --listen: %s\n",
                 std::string(hp.status().message()).c_str());
    return 2;
  }
  sockaddr_in6 a6{};
  sockaddr_in a4{};
  const bool v6 = ::inet_pton(AF_INET6, hp->host.c_str(), &a6.sin6_addr) == 1;
  if (!v6 && ::inet_pton(AF_INET, hp->host == "localhost" ? "127.0.0.1" : hp->host.c_str(),
                         &a4.sin_addr) != 1) {
    std::fprintf(stderr, "custody-lab-backend: --listen needs an IP address\n");
    return 2;
  }
  a6.sin6_family = AF_INET6;
  a6.sin6_port = htons(hp->port);
  a4.sin_family = AF_INET;
  a4.sin_port = htons(hp->port);
  custody::UniqueFd lfd(::socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
  const int one = 1;
  ::setsockopt(lfd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const bool bound = v6 ? ::bind(lfd.get(), reinterpret_cast<sockaddr*>(&a6), sizeof(a6)) == 0
                        : ::bind(lfd.get(), reinterpret_cast<sockaddr*>(&a4), sizeof(a4)) == 0;
  if (!bound || ::listen(lfd.get(), SOMAXCONN) != 0) {
    std::fprintf(stderr, "custody-lab-backend: cannot listen on %s: %s\n", listen.c_str(),
                 std::strerror(errno));
    return 1;
  }
  custody::UniqueFd ep(::epoll_create1(0));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = lfd.get();
  ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, lfd.get(), &ev);
  std::fprintf(stderr, "custody-lab-backend: %s on %s\n", mode.c_str(), listen.c_str());

  std::unordered_map<int, std::unique_ptr<Conn>> conns;
  std::unique_ptr<char[]> buf(new char[kChunk]);
  epoll_event events[128];
  for (;;) {
    const int n = ::epoll_wait(ep.get(), events, 128, -1);
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == lfd.get()) {
        for (;;) {
          const int cfd = ::accept4(lfd.get(), nullptr, nullptr, SOCK_NONBLOCK);
          if (cfd < 0) {
            break;
          }
          ::setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          auto c = std::make_unique<Conn>();
          c->fd.Reset(cfd);
          c->awaiting_proxy_header = proxy_protocol;
          epoll_event cev{};
          cev.events = EPOLLIN | EPOLLOUT | EPOLLET;
          cev.data.fd = cfd;
          ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, cfd, &cev);
          conns[cfd] = std::move(c);
        }
        continue;
      }
      auto it = conns.find(fd);
      if (it == conns.end()) {
        continue;
      }
      Conn& c = *it->second;
      bool alive = true;
      // Edge-triggered: go on until the socket would block either way. Reading stops while
      // much is queued to send (backpressure) and resumes once it is sent.
      for (;;) {
        bool read_blocked = false;
        while (!c.peer_eof && c.out.size() - c.out_off < 4 * kChunk) {
          const ssize_t r = ::recv(fd, buf.get(), kChunk, 0);
          if (r > 0 && c.awaiting_proxy_header) {
            c.in.append(buf.get(), static_cast<size_t>(r));
            const int got = ParseProxyHeader(c.in, &c.client);
            if (got < 0) {
              std::fprintf(stderr, "custody-lab-backend: a connection without a PROXY header\n");
              alive = false;
              break;
            }
            if (got == 1) {
              c.awaiting_proxy_header = false;
              if (echo_mode) {
                c.out += c.in;
                c.in.clear();
              } else {
                HandleHttp(c);
              }
            }
          } else if (r > 0) {
            if (echo_mode) {
              c.out.append(buf.get(), static_cast<size_t>(r));
            } else {
              c.in.append(buf.get(), static_cast<size_t>(r));
              HandleHttp(c);
            }
          } else if (r == 0) {
            c.peer_eof = true;
          } else {
            alive = errno == EAGAIN || errno == EWOULDBLOCK;
            read_blocked = true;
            break;
          }
        }
        if (!alive || !Flush(c)) {
          alive = false;
          break;
        }
        const bool send_blocked = c.out_off != c.out.size() || c.body_left > 0;
        if (read_blocked || c.peer_eof || send_blocked) {
          break;
        }
      }
      const bool drained = c.out_off == c.out.size() && c.body_left == 0;
      if (alive && c.peer_eof && drained && !c.shut_wr) {
        ::shutdown(fd, SHUT_WR);  // Pass the client's end on, after everything it asked for.
        c.shut_wr = true;
      }
      if (!alive || (events[i].events & (EPOLLERR | EPOLLHUP)) || (c.shut_wr && c.peer_eof)) {
        conns.erase(it);  // Closes the socket.
      }
    }
  }
}

// custody-bench-sign: signatures per second and latency, either through custody-keyd over gRPC
// (mutual TLS, the proxy identity from lab.env) or straight into the same PKCS#11 token with
// C_SignInit/C_Sign (the peer: SoftHSM called directly). bench/sign.sh runs both side by side.
//
// Output: one line per run, "mode=... key=... concurrency=... ops=... seconds=... ops_per_s=...
// p50_us=... p99_us=...", for the script to turn into ratios.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "custody/v1/key_service.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "hsm/pkcs11.h"
#include "hsm/signature_scheme.h"
#include "hsm/token_objects.h"
#include "keyservice/batching_signer.h"
#include "keyservice/client.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string mode = "keyd";
  std::string key = "lab-ec256";
  std::string scheme = "ecdsa_secp256r1_sha256";
  int concurrency = 1;
  double seconds = 3;
  double warmup_seconds = 0.5;
  std::string module;
  std::string token = "custody-lab";
  std::string pin_file;
  bool health = false;      // keyd mode: call the health check instead of Sign (transport cost).
  int connections = 1;      // keyd mode: TCP connections the calls are spread over.
  int batch_in_flight = 0;  // keyd mode: >0 sends through BatchingSigner with this many calls.
};

struct Result {
  uint64_t ops = 0;
  uint64_t errors = 0;
  double seconds = 0;
  std::vector<double> latencies_us;
};

void Report(const Options& o, Result& r) {
  std::sort(r.latencies_us.begin(), r.latencies_us.end());
  auto pct = [&](double p) {
    if (r.latencies_us.empty()) {
      return 0.0;
    }
    return r.latencies_us[std::min(r.latencies_us.size() - 1,
                                   static_cast<std::size_t>(p * r.latencies_us.size()))];
  };
  std::printf(
      "mode=%s key=%s scheme=%s concurrency=%d connections=%d ops=%llu errors=%llu seconds=%.3f "
      "ops_per_s=%.1f p50_us=%.1f p99_us=%.1f\n",
      o.mode.c_str(), o.key.c_str(), o.scheme.c_str(), o.concurrency, o.connections,
      static_cast<unsigned long long>(r.ops), static_cast<unsigned long long>(r.errors), r.seconds,
      r.seconds > 0 ? r.ops / r.seconds : 0.0, pct(0.50), pct(0.99));
}

// MeasureWindow lets the load warm up, then opens `measuring` for the measured time, then asks
// the load to stop; returns the measured seconds.
double MeasureWindow(const Options& o, std::atomic<bool>& measuring, std::atomic<bool>& stop) {
  std::this_thread::sleep_for(std::chrono::duration<double>(o.warmup_seconds));
  measuring = true;
  const auto start = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
  measuring = false;
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  stop = true;
  return seconds;
}

// Direct: `concurrency` threads, each with its own logged-in session, signing in a loop.
int RunDirect(const Options& o, const custody::hsm::SchemeInfo& scheme,
              const std::vector<uint8_t>& digest) {
  auto module = custody::hsm::Pkcs11Module::Load(o.module);
  if (!module.ok()) {
    std::fprintf(stderr, "%s\n", module.status().ToString().c_str());
    return 2;
  }
  auto slot = (*module)->FindSlotByTokenLabel(o.token);
  auto pin = custody::ReadSecretFile(o.pin_file);
  if (!slot.ok() || !pin.ok()) {
    std::fprintf(stderr, "token or PIN: %s %s\n", slot.status().ToString().c_str(),
                 pin.status().ToString().c_str());
    return 2;
  }
  CK_FUNCTION_LIST* fn = (*module)->fn();
  CK_MECHANISM mech{scheme.family == custody::hsm::SignFamily::kEcdsa ? CKM_ECDSA : CKM_RSA_PKCS,
                    nullptr, 0};
  std::vector<uint8_t> data = digest;
  if (scheme.family == custody::hsm::SignFamily::kRsaPkcs1) {
    auto prefix = custody::hsm::DigestInfoPrefix(scheme.hash);
    data.insert(data.begin(), prefix.begin(), prefix.end());
  } else if (scheme.family != custody::hsm::SignFamily::kEcdsa) {
    std::fprintf(stderr, "direct mode measures ECDSA and RSA PKCS#1 schemes\n");
    return 2;
  }
  std::atomic<bool> measuring{false};
  std::atomic<bool> stop{false};
  std::atomic<bool> failed{false};
  std::mutex mu;
  Result total;
  std::vector<std::thread> threads;
  for (int t = 0; t < o.concurrency; ++t) {
    threads.emplace_back([&] {
      CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
      CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
      std::string id = custody::hsm::MakeKeyId(o.key, 1);
      CK_RV rv = fn->C_OpenSession(*slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
      if (rv == CKR_OK) {
        rv = fn->C_Login(s, CKU_USER, reinterpret_cast<CK_UTF8CHAR_PTR>(pin->data()), pin->size());
        rv = rv == CKR_USER_ALREADY_LOGGED_IN ? CKR_OK : rv;
      }
      auto keys = rv == CKR_OK
                      ? custody::hsm::FindObjects(
                            fn, s, {{CKA_CLASS, &cls, sizeof(cls)}, {CKA_ID, id.data(), id.size()}})
                      : custody::hsm::RvToStatus(rv, "session");
      if (!keys.ok() || keys->empty()) {
        std::fprintf(stderr, "key %s: %s\n", id.c_str(),
                     keys.ok() ? "not found" : keys.status().ToString().c_str());
        failed = true;
        return;
      }
      Result mine;
      while (!stop.load(std::memory_order_relaxed)) {
        const auto start = Clock::now();
        uint8_t sig[1024];
        CK_ULONG len = sizeof(sig);
        rv = fn->C_SignInit(s, &mech, keys->front());
        if (rv == CKR_OK) {
          rv = fn->C_Sign(s, data.data(), data.size(), sig, &len);
        }
        if (measuring.load(std::memory_order_relaxed)) {
          rv == CKR_OK ? ++mine.ops : ++mine.errors;
          mine.latencies_us.push_back(
              std::chrono::duration<double, std::micro>(Clock::now() - start).count());
        }
      }
      fn->C_CloseSession(s);
      std::lock_guard<std::mutex> lock(mu);
      total.ops += mine.ops;
      total.errors += mine.errors;
      total.latencies_us.insert(total.latencies_us.end(), mine.latencies_us.begin(),
                                mine.latencies_us.end());
    });
  }
  total.seconds = MeasureWindow(o, measuring, stop);
  for (auto& th : threads) {
    th.join();
  }
  if (failed) {
    return 2;
  }
  Report(o, total);
  return 0;
}

// Keyd: `concurrency` calls kept in flight with gRPC's callback API on one channel.
int RunKeyd(const Options& o, const custody::hsm::SchemeInfo& scheme,
            const std::vector<uint8_t>& digest) {
  auto settings = custody::keyservice::SettingsForIdentity({}, "proxy");
  if (!settings.ok()) {
    std::fprintf(stderr, "%s\n", settings.status().ToString().c_str());
    return 2;
  }
  std::vector<std::unique_ptr<custody::v1::KeyService::Stub>> stubs;
  std::vector<std::unique_ptr<grpc::health::v1::Health::Stub>> health_stubs;
  for (int i = 0; i < o.connections; ++i) {
    auto channel = custody::keyservice::MakeChannel(*settings, i);
    if (!channel.ok()) {
      std::fprintf(stderr, "%s\n", channel.status().ToString().c_str());
      return 2;
    }
    stubs.push_back(custody::v1::KeyService::NewStub(*channel));
    health_stubs.push_back(grpc::health::v1::Health::NewStub(*channel));
  }
  custody::v1::SignRequest req;
  req.set_key_name(o.key);
  req.set_scheme(static_cast<custody::v1::SignatureScheme>(scheme.scheme));
  req.set_digest(digest.data(), digest.size());

  std::atomic<bool> measuring{false};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable done_cv;
  int outstanding = 0;
  Result total;

  grpc::health::v1::HealthCheckRequest health_req;
  std::atomic<uint64_t> next_call{0};
  std::unique_ptr<custody::keyservice::BatchingSigner> batcher;
  if (o.batch_in_flight > 0) {
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (int i = 0; i < o.connections; ++i) {
      channels.push_back(*custody::keyservice::MakeChannel(*settings, i));
    }
    batcher = std::make_unique<custody::keyservice::BatchingSigner>(channels, o.batch_in_flight,
                                                                    absl::Seconds(10));
  }
  struct Call {
    grpc::ClientContext ctx;
    custody::v1::SignResponse resp;
    grpc::health::v1::HealthCheckResponse health_resp;
    Clock::time_point start;
  };
  std::function<void()> issue = [&] {
    auto* call = new Call;
    call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    call->start = Clock::now();
    auto on_done = [&, call](grpc::Status st) {
      const double us =
          std::chrono::duration<double, std::micro>(Clock::now() - call->start).count();
      delete call;
      bool again = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (measuring.load()) {
          st.ok() ? ++total.ops : ++total.errors;
          total.latencies_us.push_back(us);
        }
        if (!st.ok() && total.errors < 3) {
          std::fprintf(stderr, "sign failed: %s\n", st.error_message().c_str());
        }
        again = !stop.load();
        if (!again) {
          --outstanding;
          done_cv.notify_all();
        }
      }
      if (again) {
        issue();
      }
    };
    const std::size_t c = next_call++ % stubs.size();
    if (batcher != nullptr) {
      batcher->Sign(req, [on_done](const grpc::Status& st, const custody::v1::SignResponse&) {
        on_done(st);
      });
    } else if (o.health) {
      health_stubs[c]->async()->Check(&call->ctx, &health_req, &call->health_resp, on_done);
    } else {
      stubs[c]->async()->Sign(&call->ctx, &req, &call->resp, on_done);
    }
  };
  {
    std::lock_guard<std::mutex> lock(mu);
    outstanding = o.concurrency;
  }
  for (int i = 0; i < o.concurrency; ++i) {
    issue();
  }
  total.seconds = MeasureWindow(o, measuring, stop);
  std::unique_lock<std::mutex> lock(mu);
  done_cv.wait(lock, [&] { return outstanding == 0; });
  Report(o, total);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"custody-bench-sign: signing throughput and latency, via custody-keyd or direct"};
  Options o;
  app.add_option("--mode", o.mode, "keyd or direct")->check(CLI::IsMember({"keyd", "direct"}));
  app.add_option("--key", o.key, "key name")->capture_default_str();
  app.add_option("--scheme", o.scheme, "TLS scheme")->capture_default_str();
  app.add_option("--concurrency", o.concurrency, "requests in flight")->check(CLI::Range(1, 1024));
  app.add_option("--seconds", o.seconds, "measured time")->check(CLI::Range(0.1, 600.0));
  app.add_option("--warmup-seconds", o.warmup_seconds, "unmeasured time first");
  app.add_option("--module", o.module, "PKCS#11 module (direct) [CUSTODY_PKCS11_MODULE]");
  app.add_option("--token", o.token, "token label (direct)")->capture_default_str();
  app.add_option("--pin-file", o.pin_file, "PIN file (direct) [CUSTODY_PIN_FILE]");
  app.add_flag("--health", o.health, "keyd mode: health checks instead of signatures");
  app.add_option("--connections", o.connections, "keyd mode: connections to spread calls over")
      ->check(CLI::Range(1, 64));
  app.add_option("--batch-in-flight", o.batch_in_flight,
                 "keyd mode: sign through BatchingSigner with this many calls in flight (0: "
                 "one unary Sign call per signature)")
      ->check(CLI::Range(0, 64));
  CLI11_PARSE(app, argc, argv);
  if (o.module.empty() && std::getenv("CUSTODY_PKCS11_MODULE") != nullptr) {
    o.module = std::getenv("CUSTODY_PKCS11_MODULE");
  }
  if (o.pin_file.empty() && std::getenv("CUSTODY_PIN_FILE") != nullptr) {
    o.pin_file = std::getenv("CUSTODY_PIN_FILE");
  }
  const auto scheme = custody::hsm::FindSchemeByName(o.scheme);
  if (!scheme || scheme->hash == custody::hsm::HashAlg::kNone) {
    std::fprintf(stderr, "scheme %s: use an ECDSA or RSA scheme\n", o.scheme.c_str());
    return 2;
  }
  const std::string message = "custody benchmark message";
  auto digest = custody::hsm::Hash(
      scheme->hash,
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(message.data()), message.size()));
  if (!digest.ok()) {
    std::fprintf(stderr, "%s\n", digest.status().ToString().c_str());
    return 2;
  }
  return o.mode == "direct" ? RunDirect(o, *scheme, *digest) : RunKeyd(o, *scheme, *digest);
}

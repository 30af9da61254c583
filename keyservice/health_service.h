// HealthService: the standard grpc.health.v1.Health protocol (Check and Watch) for keyd, served
// on gRPC's synchronous thread pool.
//
// gRPC's built-in health service uses the callback API, which (with the poll-based I/O of this
// gRPC) starts one extra polling thread per CPU. Those threads take turns at polling with the
// signing threads and wake for every signing message: measured, about 10 us of keyd's CPU per
// signature. This one adds no thread; a Watch call holds a pool thread while it lasts, so at
// most kMaxWatchers run at once (further ones get RESOURCE_EXHAUSTED).
#pragma once

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"

namespace custody::keyservice {

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  static constexpr int kMaxWatchers = 8;

  // HealthService knows the services named in `services` ("" is always known: the server as a
  // whole), all NOT_SERVING until SetServing.
  explicit HealthService(std::initializer_list<std::string> services);

  // SetServing sets every known service SERVING (true) or NOT_SERVING (false).
  void SetServing(bool serving);
  // Shutdown sets every service NOT_SERVING for good and ends the Watch calls (after sending
  // that last status), so that the server can shut down.
  void Shutdown();

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  using Status = grpc::health::v1::HealthCheckResponse::ServingStatus;
  // StatusLocked: the service's status, SERVICE_UNKNOWN if it is not known.
  Status StatusLocked(const std::string& service) const;

  std::mutex mu_;  // Guards what follows.
  std::condition_variable changed_;
  std::map<std::string, Status> status_;
  uint64_t generation_ = 0;  // Bumped on every change.
  bool shut_down_ = false;
  int watchers_ = 0;
};

}  // namespace custody::keyservice

#include "keyservice/health_service.h"

#include "absl/strings/str_cat.h"

namespace custody::keyservice {

using grpc::health::v1::HealthCheckResponse;

namespace {

// How often a Watch call checks whether its client has gone, while nothing changes.
constexpr auto kWatchPoll = std::chrono::seconds(1);

}  // namespace

HealthService::HealthService(std::initializer_list<std::string> services) {
  status_[""] = HealthCheckResponse::NOT_SERVING;
  for (const std::string& s : services) {
    status_[s] = HealthCheckResponse::NOT_SERVING;
  }
}

void HealthService::SetServing(bool serving) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shut_down_) {
    return;
  }
  for (auto& [name, status] : status_) {
    status = serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
  }
  ++generation_;
  changed_.notify_all();
}

void HealthService::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [name, status] : status_) {
    status = HealthCheckResponse::NOT_SERVING;
  }
  shut_down_ = true;
  ++generation_;
  changed_.notify_all();
}

HealthService::Status HealthService::StatusLocked(const std::string& service) const {
  auto it = status_.find(service);
  return it == status_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
}

grpc::Status HealthService::Check(grpc::ServerContext* /*context*/,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  const Status status = StatusLocked(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("unknown service '", request->service(), "'"));
  }
  response->set_status(status);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  std::unique_lock<std::mutex> lock(mu_);
  if (watchers_ >= kMaxWatchers) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("at most ", kMaxWatchers, " health watchers at once"));
  }
  ++watchers_;
  // The first answer comes at once; then one per change of this service's status.
  uint64_t seen = generation_;
  Status sent = StatusLocked(request->service());
  HealthCheckResponse response;
  response.set_status(sent);
  bool open = true;
  {
    lock.unlock();
    open = writer->Write(response);
    lock.lock();
  }
  // A change made while a write was under way (the lock released) is seen next: the watcher
  // hears the last status, NOT_SERVING included, before a shutdown ends the call.
  while (open && !context->IsCancelled()) {
    if (generation_ == seen) {
      if (shut_down_) {
        break;  // Nothing left to tell.
      }
      changed_.wait_for(lock, kWatchPoll, [&] { return generation_ != seen; });
      continue;
    }
    seen = generation_;
    const Status now = StatusLocked(request->service());
    if (now == sent) {
      continue;
    }
    sent = now;
    response.set_status(now);
    lock.unlock();
    open = writer->Write(response);
    lock.lock();
  }
  --watchers_;
  return shut_down_ ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "custody-keyd is shutting down")
                    : grpc::Status::OK;
}

}  // namespace custody::keyservice

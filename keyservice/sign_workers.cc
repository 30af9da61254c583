#include "keyservice/sign_workers.h"

namespace custody::keyservice {
namespace {

// Call is one asynchronous RPC of the signing path from the moment it is requested until its
// answer is sent. Owned by its completion queue: deleted on its last event (see Run).
class Call {
 public:
  virtual ~Call() = default;
  // Serve handles the request and starts sending the answer.
  virtual void Serve(KeyServiceImpl& service) = 0;
  bool answered = false;
};

// UnaryCall is a Call of one unary method: Request, Response and the service's handler.
template <typename Request, typename Response>
class UnaryCall final : public Call {
 public:
  using Handler = grpc::Status (KeyServiceImpl::*)(grpc::ServerContext*, const Request*, Response*);
  explicit UnaryCall(Handler handler) : handler_(handler) {}

  void Serve(KeyServiceImpl& service) override {
    const grpc::Status status = (service.*handler_)(&context, &request, &response);
    answered = true;
    if (status.ok()) {
      responder.Finish(response, status, this);
    } else {
      responder.FinishWithError(status, this);
    }
  }

  grpc::ServerContext context;
  Request request;
  Response response;
  grpc::ServerAsyncResponseWriter<Response> responder{&context};

 private:
  Handler handler_;
};

using SignCall = UnaryCall<custody::v1::SignRequest, custody::v1::SignResponse>;
using SignBatchCall = UnaryCall<custody::v1::SignBatchRequest, custody::v1::SignBatchResponse>;

void RequestSign(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue) {
  auto* call = new SignCall(&KeyServiceImpl::HandleSign);
  service.RequestSign(&call->context, &call->request, &call->responder, queue, queue,
                      static_cast<Call*>(call));
}

void RequestSignBatch(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue) {
  auto* call = new SignBatchCall(&KeyServiceImpl::HandleSignBatch);
  service.RequestSignBatch(&call->context, &call->request, &call->responder, queue, queue,
                           static_cast<Call*>(call));
}

}  // namespace

SignWorkers::SignWorkers(KeyServiceImpl& service,
                         std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues)
    : service_(service), queues_(std::move(queues)) {}

SignWorkers::~SignWorkers() { Stop(); }

void SignWorkers::Start() {
  for (auto& queue : queues_) {
    threads_.emplace_back([this, q = queue.get()] { Run(q); });
  }
}

void SignWorkers::Stop() {
  if (threads_.empty()) {
    return;
  }
  for (auto& queue : queues_) {
    queue->Shutdown();
  }
  for (auto& t : threads_) {
    t.join();
  }
  threads_.clear();
}

void SignWorkers::Run(grpc::ServerCompletionQueue* queue) {
  RequestSign(service_, queue);
  RequestSignBatch(service_, queue);
  void* tag = nullptr;
  bool ok = false;
  while (queue->Next(&tag, &ok)) {
    auto* call = static_cast<Call*>(tag);
    if (call->answered || !ok) {
      // The answer went out (or the server is shutting down): the call is over.
      delete call;
      continue;
    }
    call->Serve(service_);
    // Ask for the next call of this kind only when free: a call matched to a busy worker
    // would wait behind its signatures while other workers idle.
    if (dynamic_cast<SignCall*>(call) != nullptr) {
      RequestSign(service_, queue);
    } else {
      RequestSignBatch(service_, queue);
    }
  }
}

}  // namespace custody::keyservice

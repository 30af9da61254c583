#include "keyservice/sign_workers.h"

namespace custody::keyservice {
namespace {

// SignCall is one Sign RPC from the moment it is requested until its answer is sent.
struct SignCall {
  grpc::ServerContext context;
  custody::v1::SignRequest request;
  custody::v1::SignResponse response;
  grpc::ServerAsyncResponseWriter<custody::v1::SignResponse> responder{&context};
  bool answered = false;
};

void RequestOne(KeyServiceImpl& service, grpc::ServerCompletionQueue* queue) {
  auto* call = new SignCall;  // Owned by the queue until its last event (see Run).
  service.RequestSign(&call->context, &call->request, &call->responder, queue, queue, call);
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
  RequestOne(service_, queue);
  void* tag = nullptr;
  bool ok = false;
  while (queue->Next(&tag, &ok)) {
    auto* call = static_cast<SignCall*>(tag);
    if (call->answered || !ok) {
      // The answer went out (or the server is shutting down): the call is over.
      delete call;
      continue;
    }
    const grpc::Status status = service_.HandleSign(&call->context, &call->request,
                                                    &call->response);
    call->answered = true;
    if (status.ok()) {
      call->responder.Finish(call->response, status, call);
    } else {
      call->responder.FinishWithError(status, call);
    }
    // Ask for the next call only when free: a call matched to a busy worker would wait behind
    // its signature while other workers idle.
    RequestOne(service_, queue);
  }
}

}  // namespace custody::keyservice

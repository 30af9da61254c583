// SignWorkers: the threads of the signing RPCs (Sign, SignBatch, SignStream). Each worker polls
// its own completion queue. Unary calls are signed inline, so the thread that reads a request off
// the socket is the one that calls the HSM and writes the answer: no hand-off between threads.
// The number of workers is the number of HSM sessions, which bounds the unary signatures in
// flight; further calls wait in gRPC until a worker is free or their deadline passes. SignStream
// messages are signed on the worker's thread too when the signatures are quick, else on the
// service's helper threads (see StreamCall in sign_workers.cc).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "keyservice/key_service.h"

namespace custody::keyservice {

class SignWorkers {
 public:
  // SignWorkers serves `service`'s Sign calls on one thread per queue in `queues` (obtained
  // from ServerBuilder::AddCompletionQueue before the server was built).
  SignWorkers(KeyServiceImpl& service,
              std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues);
  ~SignWorkers();
  SignWorkers(const SignWorkers&) = delete;
  SignWorkers& operator=(const SignWorkers&) = delete;

  // Start starts the threads. Call after the server is built and started.
  void Start();
  // Drain ends every SignStream call (and any opened from now on) once the items it has read
  // are answered, so that clients move to another replica. Call before grpc::Server::Shutdown,
  // which would otherwise wait for these long-lived calls until its deadline.
  void Drain();
  // Stop shuts the queues down and joins the threads. Call after grpc::Server::Shutdown.
  void Stop();

  // Streams: the SignStream calls open now (opaque to callers).
  struct Streams {
    std::mutex mu;  // Guards what follows.
    std::set<void*> open;
    bool draining = false;
  };

 private:
  void Run(grpc::ServerCompletionQueue* queue);

  KeyServiceImpl& service_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues_;
  std::vector<std::thread> threads_;
  Streams streams_;
};

}  // namespace custody::keyservice

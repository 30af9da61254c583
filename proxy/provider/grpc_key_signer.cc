#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "custody/v1/key_service.grpc.pb.h"
#include "keyservice/client.h"
#include "proxy/provider/key_signer.h"

namespace custody::provider {
namespace {

absl::Status FromGrpc(const grpc::Status& st) {
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                      absl::StrCat("key service: ", st.error_message()));
}

// GrpcKeySigner: unary calls on one mutual-TLS channel.
class GrpcKeySigner final : public KeySigner {
 public:
  explicit GrpcKeySigner(std::shared_ptr<grpc::Channel> channel)
      : stub_(custody::v1::KeyService::NewStub(std::move(channel))) {}

  absl::StatusOr<custody::v1::SignResponse> Sign(const custody::v1::SignRequest& request,
                                                 absl::Time deadline) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    custody::v1::SignResponse response;
    if (grpc::Status st = stub_->Sign(&ctx, request, &response); !st.ok()) {
      return FromGrpc(st);
    }
    return response;
  }

  absl::StatusOr<custody::v1::Key> GetKey(const std::string& name, absl::Time deadline) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    custody::v1::GetKeyRequest request;
    request.set_name(name);
    custody::v1::Key key;
    if (grpc::Status st = stub_->GetKey(&ctx, request, &key); !st.ok()) {
      return FromGrpc(st);
    }
    return key;
  }

 private:
  std::unique_ptr<custody::v1::KeyService::Stub> stub_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<KeySigner>> MakeGrpcKeySignerFromEnv() {
  const char* identity = std::getenv("CUSTODY_IDENTITY");
  auto settings = keyservice::SettingsForIdentity(
      {}, identity != nullptr && *identity != '\0' ? identity : "proxy");
  if (!settings.ok()) {
    return settings.status();
  }
  auto channel = keyservice::MakeChannel(*settings);
  if (!channel.ok()) {
    return channel.status();
  }
  return std::make_shared<GrpcKeySigner>(*std::move(channel));
}

}  // namespace custody::provider

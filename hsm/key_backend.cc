#include "hsm/key_backend.h"

#include "absl/strings/str_cat.h"

namespace custody::hsm {

absl::StatusOr<SignInput> PrepareSignInput(const SchemeInfo& scheme, bool is_message,
                                           absl::Span<const uint8_t> input,
                                           std::size_t max_message_bytes) {
  if (input.empty()) {
    return absl::InvalidArgumentError(is_message ? "message is empty"
                                                 : "digest is empty (set digest or message)");
  }
  if (scheme.hash == HashAlg::kNone) {
    if (!is_message) {
      return absl::InvalidArgumentError(absl::StrCat(
          scheme.name, " signs the message itself (RFC 8032 PureEdDSA): send message, not digest"));
    }
  }
  if (is_message) {
    if (input.size() > max_message_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("message of ", input.size(),
                                                     " bytes is over the limit of ",
                                                     max_message_bytes, " bytes"));
    }
    if (scheme.hash == HashAlg::kNone) {
      return SignInput{scheme, std::vector<uint8_t>(input.begin(), input.end())};
    }
    auto digest = Hash(scheme.hash, input);
    if (!digest.ok()) {
      return digest.status();
    }
    return SignInput{scheme, *std::move(digest)};
  }
  const std::size_t want = HashLength(scheme.hash);
  if (input.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("digest is ", input.size(), " bytes; ",
                                                   scheme.name, " takes a ", want, "-byte digest"));
  }
  return SignInput{scheme, std::vector<uint8_t>(input.begin(), input.end())};
}

}  // namespace custody::hsm

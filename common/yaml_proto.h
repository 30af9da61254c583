// Strict YAML (and JSON, a subset of YAML) to protobuf: the config schema lives in proto/, and
// every config file is read through here. An unknown or misspelled field, a wrong type, or an
// out-of-range number is an error naming the field's full path and the line.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "google/protobuf/message.h"

namespace custody {

// ParseYamlToProto fills `out` from YAML `text`; `source` names the text in errors (a path).
// Returns INVALID_ARGUMENT naming the field path on any mismatch with the schema.
[[nodiscard]] absl::Status ParseYamlToProto(const std::string& text, const std::string& source,
                                            google::protobuf::Message* out);

// LoadYamlFileToProto reads `path` and parses it with ParseYamlToProto.
[[nodiscard]] absl::Status LoadYamlFileToProto(const std::string& path,
                                               google::protobuf::Message* out);

}  // namespace custody

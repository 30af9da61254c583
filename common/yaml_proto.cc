#include "common/yaml_proto.h"

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <limits>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/status.h"

namespace custody {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

class YamlToProto {
 public:
  explicit YamlToProto(std::string source) : source_(std::move(source)) {}

  absl::Status FillMessage(const YAML::Node& node, const std::string& path, Message* msg) {
    if (node.IsNull()) {
      return absl::OkStatus();
    }
    if (!node.IsMap()) {
      return Error(node, path, "expected a mapping of fields");
    }
    const Descriptor* desc = msg->GetDescriptor();
    std::set<const FieldDescriptor*> seen;
    for (const auto& kv : node) {
      const std::string key = kv.first.as<std::string>();
      const std::string field_path = path.empty() ? key : absl::StrCat(path, ".", key);
      const FieldDescriptor* field = desc->FindFieldByName(key);
      if (field == nullptr) {
        field = desc->FindFieldByCamelcaseName(key);
      }
      if (field == nullptr) {
        return Error(kv.first, field_path,
                     absl::StrCat("unknown field; known fields here: ", KnownFields(desc)));
      }
      if (!seen.insert(field).second) {
        return Error(kv.first, field_path, "given twice; keep one");
      }
      if (field->is_repeated()) {
        CUSTODY_RETURN_IF_ERROR(FillRepeated(kv.second, field_path, field, msg));
      } else {
        CUSTODY_RETURN_IF_ERROR(FillSingle(kv.second, field_path, field, msg));
      }
    }
    return absl::OkStatus();
  }

 private:
  static std::string KnownFields(const Descriptor* desc) {
    std::vector<std::string> names;
    for (int i = 0; i < desc->field_count(); ++i) {
      names.push_back(desc->field(i)->name());
    }
    return absl::StrJoin(names, ", ");
  }

  absl::Status Error(const YAML::Node& node, const std::string& path, const std::string& what) {
    const YAML::Mark mark = node.Mark();
    std::string where = source_;
    if (mark.line >= 0) {
      absl::StrAppend(&where, ":", mark.line + 1);
    }
    return absl::InvalidArgumentError(absl::StrCat(where, ": field '", path, "': ", what));
  }

  absl::Status FillRepeated(const YAML::Node& node, const std::string& path,
                            const FieldDescriptor* field, Message* msg) {
    if (node.IsNull()) {
      return absl::OkStatus();
    }
    if (!node.IsSequence()) {
      return Error(node, path, "expected a list");
    }
    for (std::size_t i = 0; i < node.size(); ++i) {
      CUSTODY_RETURN_IF_ERROR(
          FillOne(node[i], absl::StrCat(path, "[", i, "]"), field, msg, /*repeated=*/true));
    }
    return absl::OkStatus();
  }

  absl::Status FillSingle(const YAML::Node& node, const std::string& path,
                          const FieldDescriptor* field, Message* msg) {
    if (node.IsNull() && field->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE) {
      return Error(node, path, "a value is required (remove the key to take the default)");
    }
    return FillOne(node, path, field, msg, /*repeated=*/false);
  }

  absl::Status FillOne(const YAML::Node& node, const std::string& path,
                       const FieldDescriptor* field, Message* msg, bool repeated) {
    const Reflection* refl = msg->GetReflection();
    if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      Message* sub = repeated ? refl->AddMessage(msg, field) : refl->MutableMessage(msg, field);
      return FillMessage(node, path, sub);
    }
    if (!node.IsScalar()) {
      return Error(node, path, "expected a single value");
    }
    const std::string text = node.Scalar();
    const bool quoted = node.Tag() == "!";
    switch (field->cpp_type()) {
      case FieldDescriptor::CPPTYPE_STRING:
        repeated ? refl->AddString(msg, field, text) : refl->SetString(msg, field, text);
        return absl::OkStatus();
      case FieldDescriptor::CPPTYPE_BOOL: {
        const std::string lower = absl::AsciiStrToLower(text);
        if (quoted || (lower != "true" && lower != "false")) {
          return Error(node, path, absl::StrCat("expected true or false, got '", text, "'"));
        }
        repeated ? refl->AddBool(msg, field, lower == "true")
                 : refl->SetBool(msg, field, lower == "true");
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_UINT32: {
        uint32_t v = 0;
        if (!absl::SimpleAtoi(text, &v)) {
          return Error(
              node, path,
              absl::StrCat("expected a whole number from 0 to 4294967295, got '", text, "'"));
        }
        repeated ? refl->AddUInt32(msg, field, v) : refl->SetUInt32(msg, field, v);
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_INT32: {
        int32_t v = 0;
        if (!absl::SimpleAtoi(text, &v)) {
          return Error(node, path, absl::StrCat("expected a whole number, got '", text, "'"));
        }
        repeated ? refl->AddInt32(msg, field, v) : refl->SetInt32(msg, field, v);
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_UINT64: {
        uint64_t v = 0;
        if (!absl::SimpleAtoi(text, &v)) {
          return Error(node, path, absl::StrCat("expected a whole number, got '", text, "'"));
        }
        repeated ? refl->AddUInt64(msg, field, v) : refl->SetUInt64(msg, field, v);
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_INT64: {
        int64_t v = 0;
        if (!absl::SimpleAtoi(text, &v)) {
          return Error(node, path, absl::StrCat("expected a whole number, got '", text, "'"));
        }
        repeated ? refl->AddInt64(msg, field, v) : refl->SetInt64(msg, field, v);
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_DOUBLE: {
        double v = 0;
        if (!absl::SimpleAtod(text, &v)) {
          return Error(node, path, absl::StrCat("expected a number, got '", text, "'"));
        }
        repeated ? refl->AddDouble(msg, field, v) : refl->SetDouble(msg, field, v);
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_ENUM: {
        const auto* value = field->enum_type()->FindValueByName(absl::AsciiStrToUpper(text));
        if (value == nullptr) {
          return Error(node, path, absl::StrCat("unknown value '", text, "'"));
        }
        repeated ? refl->AddEnum(msg, field, value) : refl->SetEnum(msg, field, value);
        return absl::OkStatus();
      }
      default:
        return Error(node, path, "field type not supported in config files");
    }
  }

  std::string source_;
};

}  // namespace

absl::Status ParseYamlToProto(const std::string& text, const std::string& source,
                              google::protobuf::Message* out) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    // yaml-cpp reports errors by exception; they stop here, at the edge.
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", e.mark.line + 1, ": not valid YAML: ", e.msg));
  }
  out->Clear();
  try {
    return YamlToProto(source).FillMessage(root, "", out);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ":", e.mark.line + 1, ": ", e.msg));
  }
}

absl::Status LoadYamlFileToProto(const std::string& path, google::protobuf::Message* out) {
  CUSTODY_ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  return ParseYamlToProto(text, path, out);
}

}  // namespace custody

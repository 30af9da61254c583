#include "keyservice/audit_log.h"

#include <fcntl.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/ossl.h"
#include "common/status.h"

namespace custody::keyservice {
namespace {

const std::string kGenesis(64, '0');

// FieldValue extracts the string value of top-level "name" from one of our own lines. Our
// writer emits "prev" last, so the chain check needs only that field and the line's bytes.
std::optional<std::string> PrevOf(const std::string& line) {
  static constexpr std::string_view kKey = ",\"prev\":\"";
  const auto pos = line.rfind(kKey.data(), std::string::npos, kKey.size());
  if (pos == std::string::npos || line.size() < pos + kKey.size() + 64 + 2 ||
      line.substr(line.size() - 2) != "\"}") {
    return std::nullopt;
  }
  std::string prev = line.substr(pos + kKey.size(), 64);
  if (pos + kKey.size() + 64 + 2 != line.size()) {
    return std::nullopt;
  }
  return prev;
}

}  // namespace

std::string Sha256Hex(const std::string& data) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), md);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(md), sizeof(md)));
}

std::string JsonQuote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c >= 0x7f) {
          absl::StrAppendFormat(&out, "\\u%04x", c);  // Non-ASCII bytes escaped one by one.
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += "\"";
  return out;
}

AuditLog::AuditLog(std::string path, UniqueFd fd, std::string prev_hash, uint64_t next_seq,
                   std::string boot, off_t size)
    : path_(std::move(path)),
      boot_(std::move(boot)),
      fd_(std::move(fd)),
      prev_hash_(std::move(prev_hash)),
      next_seq_(next_seq),
      size_(size) {}

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  AuditLogSummary summary{0, kGenesis, 0};
  if (::access(path.c_str(), F_OK) == 0) {
    auto verified = VerifyAuditLog(path);
    if (!verified.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("audit log ", path, " does not verify (", verified.status().message(),
                       "); keep it as evidence, and start a new log at another path"));
    }
    summary = *std::move(verified);
  }
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open audit log ", path, ": ", std::strerror(errno)));
  }
  unsigned char nonce[6];
  if (RAND_bytes(nonce, sizeof(nonce)) != 1) {
    ::close(fd);
    return OsslError(absl::StatusCode::kInternal, "RAND_bytes for the audit log's id prefix");
  }
  std::string boot = absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(nonce), sizeof(nonce)));
  return std::unique_ptr<AuditLog>(new AuditLog(
      path, UniqueFd(fd), summary.last_hash, summary.records + 1, std::move(boot), summary.bytes));
}

absl::StatusOr<std::string> AuditLog::Append(const AuditRecord& r) {
  const std::string time =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone());
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t seq = next_seq_;
  const std::string id = absl::StrCat(boot_, "-", seq);
  std::string line =
      absl::StrCat("{\"seq\":", seq, ",\"id\":", JsonQuote(id), ",\"time\":", JsonQuote(time));
  auto add = [&line](const char* name, const std::string& value) {
    if (!value.empty()) {
      absl::StrAppend(&line, ",\"", name, "\":", JsonQuote(value));
    }
  };
  add("caller", r.caller);
  add("peer", r.peer);
  add("action", r.action);
  add("key", r.key);
  if (r.version != 0) {
    absl::StrAppend(&line, ",\"version\":", r.version);
  }
  add("scheme", r.scheme);
  add("outcome", r.outcome);
  add("detail", r.detail);
  absl::StrAppend(&line, ",\"latency_us\":", r.latency_us);
  absl::StrAppend(&line, ",\"prev\":\"", prev_hash_, "\"}");
  const std::string hash = Sha256Hex(line);
  line += '\n';
  if (broken_) {
    return absl::UnavailableError("audit log is broken since an earlier write failed");
  }
  const ssize_t n = ::write(fd_.get(), line.data(), line.size());
  if (n != static_cast<ssize_t>(line.size())) {
    const std::string why = n < 0 ? std::strerror(errno) : "short write";
    // Cut a partial line back off, so the chain stays whole; if that fails too, stop.
    if (n > 0 && ::ftruncate(fd_.get(), size_) != 0) {
      broken_ = true;
    }
    return absl::UnavailableError(absl::StrCat("audit log write failed: ", why));
  }
  size_ += n;
  prev_hash_ = hash;
  ++next_seq_;
  return id;
}

absl::StatusOr<AuditLogSummary> VerifyAuditLog(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
  }
  AuditLogSummary summary{0, kGenesis, 0};
  std::string line;
  while (std::getline(in, line)) {
    const uint64_t line_no = summary.records + 1;
    if (in.eof()) {
      return absl::DataLossError(absl::StrCat(path, ":", line_no, ": the last line is incomplete"));
    }
    const std::optional<std::string> claimed = PrevOf(line);
    if (!claimed) {
      return absl::DataLossError(absl::StrCat(path, ":", line_no, ": not an audit record"));
    }
    if (*claimed != summary.last_hash) {
      return absl::DataLossError(absl::StrCat(
          path, ":", line_no,
          ": hash chain broken (a record before it was changed, removed or reordered)"));
    }
    const std::string want_seq = absl::StrCat("{\"seq\":", line_no, ",");
    if (line.compare(0, want_seq.size(), want_seq) != 0) {
      return absl::DataLossError(
          absl::StrCat(path, ":", line_no, ": sequence number is not ", line_no));
    }
    summary.last_hash = Sha256Hex(line);
    summary.bytes += static_cast<off_t>(line.size() + 1);
    ++summary.records;
  }
  return summary;
}

}  // namespace custody::keyservice

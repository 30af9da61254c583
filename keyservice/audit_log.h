// AuditLog: the append-only, hash-chained record of every private-key use and every refusal.
// One JSON object per line; each line carries "prev", the SHA-256 (hex) of the line before it
// (64 zeros for the first), so removing, reordering or editing a line breaks the chain, which
// VerifyAuditLog (and `custodyctl audit verify`) detects. Records never hold a digest, message,
// signature or key material.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"

namespace custody::keyservice {

// AuditRecord is one event. Empty strings and zero numbers are left out of the line.
struct AuditRecord {
  std::string caller;    // Identity from the client certificate ("" when there was none).
  std::string peer;      // Transport address of the caller.
  std::string action;    // "sign", "get_key", "list_keys", "test_hook", ...
  std::string key;       // Key name.
  uint32_t version = 0;  // Key version used (sign) or asked for.
  std::string scheme;    // TLS signature scheme name.
  std::string outcome;   // Status code name: "OK", "PERMISSION_DENIED", ...
  std::string detail;    // Why it was refused; never secret.
  int64_t latency_us = 0;
};

class AuditLog {
 public:
  // Open appends to `path` (created 0600 if missing), continuing the chain from its last line.
  // A file whose last line is not a complete record is refused: run `custodyctl audit verify`.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const std::string& path);

  // Append writes `record` as one line (one write(2) on an O_APPEND descriptor) and returns its
  // id, unique in this log. Thread-safe; records appear in the order of their ids. A failed
  // write is cut back off the file so the chain stays whole; if even that fails, every later
  // Append fails too (UNAVAILABLE): the service stops signing rather than sign unaudited.
  [[nodiscard]] absl::StatusOr<std::string> Append(const AuditRecord& record);

  const std::string& path() const { return path_; }

 private:
  AuditLog(std::string path, UniqueFd fd, std::string prev_hash, uint64_t next_seq,
           std::string boot, off_t size);

  const std::string path_;
  const std::string boot_;  // Random per process: ids stay unique across restarts.
  // std::mutex, not absl::Mutex: the system Abseil is not instrumented for ThreadSanitizer.
  // Everything below is guarded by mu_.
  std::mutex mu_;
  UniqueFd fd_;
  std::string prev_hash_;
  uint64_t next_seq_;
  off_t size_;  // Bytes of whole records in the file.
  bool broken_ = false;
};

// AuditLogSummary is what VerifyAuditLog found.
struct AuditLogSummary {
  uint64_t records = 0;
  std::string last_hash;  // SHA-256 (hex) of the last record; 64 zeros for an empty log.
  off_t bytes = 0;
};

// VerifyAuditLog checks every line of the log at `path`: valid JSON record, and "prev" equal to
// the hash of the line before. DATA_LOSS names the first broken line. Reads line by line.
[[nodiscard]] absl::StatusOr<AuditLogSummary> VerifyAuditLog(const std::string& path);

// Sha256Hex is the lower-case hex SHA-256 of `data`.
std::string Sha256Hex(const std::string& data);

// JsonEscape quotes `s` as a JSON string (with the quotes).
std::string JsonQuote(const std::string& s);

}  // namespace custody::keyservice

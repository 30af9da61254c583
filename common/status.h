// Status propagation macros shared by every part of custody. Fallible functions return
// absl::Status / absl::StatusOr<T>; these macros keep the happy path readable.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CUSTODY_CONCAT_INNER_(a, b) a##b
#define CUSTODY_CONCAT_(a, b) CUSTODY_CONCAT_INNER_(a, b)

// CUSTODY_RETURN_IF_ERROR(expr) returns the status of `expr` from the calling function when it
// is not OK.
#define CUSTODY_RETURN_IF_ERROR(expr)                                   \
  do {                                                                  \
    if (absl::Status custody_status_ = (expr); !custody_status_.ok()) { \
      return custody_status_;                                           \
    }                                                                   \
  } while (false)

// CUSTODY_ASSIGN_OR_RETURN(lhs, expr) evaluates `expr` (an absl::StatusOr<T>); on error returns
// its status, otherwise moves the value into `lhs` (which may be a declaration).
#define CUSTODY_ASSIGN_OR_RETURN(lhs, expr) \
  CUSTODY_ASSIGN_OR_RETURN_IMPL_(CUSTODY_CONCAT_(custody_statusor_, __LINE__), lhs, expr)

#define CUSTODY_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) {                                     \
    return std::move(statusor).status();                    \
  }                                                         \
  lhs = std::move(statusor).value()

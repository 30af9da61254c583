#include "common/ossl.h"

#include <openssl/err.h>

#include "absl/strings/str_cat.h"

namespace custody {

absl::Status OsslError(absl::StatusCode code, const std::string& what) {
  std::string detail;
  unsigned long err = 0;
  while ((err = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(err, buf, sizeof(buf));
    absl::StrAppend(&detail, detail.empty() ? "" : "; ", buf);
  }
  return absl::Status(code, detail.empty() ? what : absl::StrCat(what, ": ", detail));
}

void ClearOsslErrors() { ERR_clear_error(); }

}  // namespace custody

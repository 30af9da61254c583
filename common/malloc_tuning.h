// Malloc tuning for the long-running servers (custody-keyd, custody-proxy).
//
// glibc's per-thread cache (tcache) keeps at most 7 freed chunks of each size by default. A TLS
// handshake, and a signature in the token, free and take back dozens of chunks of the same few
// sizes (OpenSSL's and SoftHSM's objects), so most of them go through the arenas' slower paths
// and locks: about a tenth of keyd's CPU per signature and 6% of the proxy's per handshake were
// malloc and free. With 128 chunks per size the ECDSA handshake cost 4-7% less CPU in both
// (three interleaved A/B runs, 12 of 13 pairs; the full bench's noise hides it). glibc reads
// the cache size only from the GLIBC_TUNABLES environment variable at process start, hence a
// re-execution.
#pragma once

#include <optional>
#include <string>

namespace custody {

// The tcache size the servers run with unless the operator chose one.
inline constexpr int kMallocTcacheCount = 128;

// TunedMallocEnv returns the GLIBC_TUNABLES value to run with, given the current one (null when
// unset): the current one plus glibc.malloc.tcache_count; nullopt when it already names that
// tunable (the operator's choice, or ours after the re-execution).
std::optional<std::string> TunedMallocEnv(const char* current);

// TuneMallocOrReexec re-executes the running program (/proc/self/exe: same pid, arguments,
// descriptors and signal mask) with TunedMallocEnv's GLIBC_TUNABLES, unless it is nullopt.
// Call first in main, before any thread starts. Returns when nothing was to be done, or when the
// re-execution failed (then the program runs on with glibc's defaults, after a line on stderr).
void TuneMallocOrReexec(char** argv);

}  // namespace custody

// The signals every custody daemon handles itself: SIGTERM and SIGINT (stop), SIGHUP (reload).
// They are blocked in every thread and waited for by the main thread (sigwait), so no handler
// runs on an arbitrary thread.
#pragma once

#include <signal.h>

namespace custody {

// TerminationSignals is the set {SIGTERM, SIGINT, SIGHUP}.
sigset_t TerminationSignals();

// BlockTerminationSignals blocks TerminationSignals() in the calling thread and in every thread
// it starts afterwards. Call first thing in main.
void BlockTerminationSignals();

}  // namespace custody

// Protocol limits shared by the key service and its clients.
#pragma once

namespace custody::keyservice {

// kMaxSignBatch is the most requests one SignBatch call may carry.
inline constexpr int kMaxSignBatch = 64;

}  // namespace custody::keyservice

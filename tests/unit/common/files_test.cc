#include "common/files.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>

namespace custody {
namespace {

std::string TempFile(const std::string& content, mode_t mode) {
  std::string path = ::testing::TempDir() + "/secret-XXXXXX";
  const int fd = ::mkstemp(path.data());
  ::close(fd);
  std::ofstream(path) << content;
  ::chmod(path.c_str(), mode);
  return path;
}

TEST(FilesTest, SecretFileDropsTrailingNewline) {
  auto pin = ReadSecretFile(TempFile("1234abcd\n", 0600));
  ASSERT_TRUE(pin.ok()) << pin.status();
  EXPECT_EQ(*pin, "1234abcd");
}

TEST(FilesTest, SecretFileReadableByOthersIsRefusedWithTheFix) {
  const std::string path = TempFile("1234", 0644);
  auto pin = ReadSecretFile(path);
  ASSERT_EQ(pin.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(pin.status().message().find("chmod 600"), absl::string_view::npos);
  EXPECT_EQ(pin.status().message().find("1234"), absl::string_view::npos) << "secret leaked";
}

TEST(FilesTest, EmptySecretIsRefused) {
  EXPECT_EQ(ReadSecretFile(TempFile("\n", 0600)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(FilesTest, MissingFileIsNotFoundAndNamed) {
  auto content = ReadFile("/nonexistent/custody");
  ASSERT_EQ(content.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(content.status().message().find("/nonexistent/custody"), absl::string_view::npos);
}

}  // namespace
}  // namespace custody

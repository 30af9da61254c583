#include "hsm/token_objects.h"

#include <gtest/gtest.h>

namespace custody::hsm {
namespace {

TEST(TokenObjectsTest, KeyIdNamesTheVersion) {
  EXPECT_EQ(MakeKeyId("web", 3), "web/v3");
  EXPECT_EQ(ParseKeyId("web", "web/v3"), 3u);
  EXPECT_EQ(ParseKeyId("web", "web/v12"), 12u);
  EXPECT_FALSE(ParseKeyId("web", "web/v0").has_value());
  EXPECT_FALSE(ParseKeyId("web", "web/v03").has_value());
  EXPECT_FALSE(ParseKeyId("web", "web/v").has_value());
  EXPECT_FALSE(ParseKeyId("web", "other/v1").has_value());
  EXPECT_FALSE(ParseKeyId("web", "web/vx").has_value());
  EXPECT_FALSE(ParseKeyId("web", "\x01").has_value());
  EXPECT_FALSE(ParseKeyId("web", "web/v99999999999").has_value());
}

TEST(TokenObjectsTest, EcParamsMapToKeyTypes) {
  EXPECT_EQ(*KeyTypeFromEcParams({0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}),
            KeyType::kEcP256);
  EXPECT_EQ(*KeyTypeFromEcParams({0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22}), KeyType::kEcP384);
  EXPECT_EQ(*KeyTypeFromEcParams({0x06, 0x03, 0x2b, 0x65, 0x70}), KeyType::kEd25519);
  // SoftHSM and pkcs11-tool write Ed25519 params as PrintableString "edwards25519".
  EXPECT_EQ(*KeyTypeFromEcParams(
                {0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9'}),
            KeyType::kEd25519);
  EXPECT_FALSE(KeyTypeFromEcParams({0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a}).ok());  // secp256k1
}

}  // namespace
}  // namespace custody::hsm

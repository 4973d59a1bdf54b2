#include "keyclient/kms_json.h"

#include <gtest/gtest.h>

namespace kmsfs::keyclient {
namespace {

TEST(KmsJson, KeyMetadataUsesAwsFieldNames) {
  KeyMetadata m;
  m.aws_account_id = "000000000000";
  m.key_id = "k";
  m.arn = "arn";
  m.deletion_date = 5.0;
  nlohmann::json j = m;
  for (const char* f : {"AWSAccountId", "KeyId", "Arn", "CreationDate", "Enabled", "Description", "KeyUsage",
                        "KeyState", "Origin", "KeyManager", "CustomerMasterKeySpec", "KeySpec",
                        "EncryptionAlgorithms", "MultiRegion", "DeletionDate"}) {
    EXPECT_TRUE(j.contains(f)) << f;
  }
  EXPECT_FALSE(j.contains("ValidTo"));
  auto back = j.get<KeyMetadata>();
  EXPECT_EQ(back.key_id, "k");
  EXPECT_EQ(back.deletion_date, 5.0);
}

TEST(KmsJson, BlobsAndPlaintextAreBase64) {
  GenerateDataKeyResponse r;
  r.key_id = "arn";
  r.ciphertext_blob = {1, 2, 3};
  r.plaintext = crypto::SecureBuffer::from_string("hi");
  nlohmann::json j = r;
  EXPECT_EQ(j["CiphertextBlob"], "AQID");
  EXPECT_EQ(j["Plaintext"], "aGk=");
  auto back = j.get<GenerateDataKeyResponse>();
  EXPECT_EQ(back.ciphertext_blob, r.ciphertext_blob);
  EXPECT_EQ(back.plaintext.view(), "hi");
  j["CiphertextBlob"] = "not base64!";
  EXPECT_THROW(j.get<GenerateDataKeyResponse>(), std::invalid_argument);
}

TEST(KmsJson, RequestsRoundTrip) {
  DecryptRequest d;
  d.ciphertext_blob = {9, 9};
  d.encryption_context = {{"a", "b"}};
  d.key_id = "alias/x";
  auto back = nlohmann::json(d).get<DecryptRequest>();
  EXPECT_EQ(back.ciphertext_blob, d.ciphertext_blob);
  EXPECT_EQ(back.encryption_context, d.encryption_context);
  EXPECT_EQ(back.key_id, d.key_id);
  ListKeysResponse l;
  l.keys = {{"id", "arn"}};
  nlohmann::json lj = l;
  EXPECT_EQ(lj["Keys"][0]["KeyArn"], "arn");
  EXPECT_EQ(lj["Truncated"], false);
}

TEST(KmsJson, ErrorsUseTheAwsErrorShape) {
  nlohmann::json j = KmsError{KmsErrorCode::NotFoundException, "gone"};
  EXPECT_EQ(j["__type"], "NotFoundException");
  EXPECT_EQ(j["message"], "gone");
  EXPECT_EQ(j.get<KmsError>().code, KmsErrorCode::NotFoundException);
}

}  // namespace
}  // namespace kmsfs::keyclient

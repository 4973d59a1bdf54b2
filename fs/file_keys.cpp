#include "fs/file_keys.h"

#include <spdlog/spdlog.h>

#include <cerrno>

#include "crypto/random.h"

namespace kmsfs::fs {

namespace {
std::shared_ptr<spdlog::logger> logger() {
  static auto l = [] {
    auto existing = spdlog::get("kmsfs.fs");
    return existing ? existing : spdlog::default_logger()->clone("kmsfs.fs");
  }();
  return l;
}

int errno_for(const keyclient::KmsError& e) {
  return e.code == keyclient::KmsErrorCode::AccessDeniedException ? EACCES : EIO;
}
}  // namespace

keyclient::EncryptionContext FileKeys::context_for(const crypto::FileId& id) const {
  return {{"kmsfs:fs", fs_id_}, {"kmsfs:file", crypto::file_id_hex(id)}};
}

Result<FileKeys::NewFile, int> FileKeys::create(const std::string& label) {
  NewFile nf;
  crypto::random_bytes(nf.header.file_id);
  keyclient::GenerateDataKeyRequest req;
  req.key_id = key_id_;
  req.key_spec = "AES_256";
  req.encryption_context = context_for(nf.header.file_id);
  auto res = kms_.generate_data_key(req);
  if (!res) {
    logger()->error("cannot create the data key of {}: {}", label, res.error().to_string());
    return unexpected(errno_for(res.error()));
  }
  if (res->plaintext.size() != 32 || res->ciphertext_blob.empty() ||
      res->ciphertext_blob.size() > crypto::FileHeader::kMaxWrappedKeySize) {
    logger()->error("cannot create the data key of {}: the KMS returned a malformed data key",
                    label);
    return unexpected(EIO);
  }
  nf.header.wrapped_key = std::move(res->ciphertext_blob);
  nf.key.file_id = nf.header.file_id;
  nf.key.dek = std::move(res->plaintext);
  return nf;
}

Result<FileKey, int> FileKeys::open(const crypto::FileHeader& header, const std::string& label) {
  keyclient::DecryptRequest req;
  req.ciphertext_blob = header.wrapped_key;
  req.encryption_context = context_for(header.file_id);
  // No KeyId: the blob names its key, and a volume may hold files wrapped
  // under an older key while a rewrap to a new one is under way.
  auto res = kms_.decrypt(req);
  if (!res) {
    logger()->error("cannot open {}: the KMS refused its data key: {}", label,
                    res.error().to_string());
    return unexpected(errno_for(res.error()));
  }
  if (res->plaintext.size() != 32) {
    logger()->error("cannot open {}: its data key has {} bytes, expected 32", label,
                    res->plaintext.size());
    return unexpected(EIO);
  }
  FileKey key;
  key.file_id = header.file_id;
  key.dek = std::move(res->plaintext);
  return key;
}

}  // namespace kmsfs::fs

#pragma once
// Per-file data keys through the KeyService: a new file's header costs one
// GenerateDataKey, opening an existing file one Decrypt. The encryption
// context is {"kmsfs:fs": filesystem id, "kmsfs:file": file id} — never a
// path, so renames rewrap nothing.

#include <string>
#include <utility>

#include "crypto/file_header.h"
#include "crypto/result.h"
#include "fs/encrypted_file.h"
#include "keyclient/key_service.h"

namespace kmsfs::fs {

class FileKeys {
 public:
  FileKeys(keyclient::KeyService& kms, std::string filesystem_id_hex, std::string key_id)
      : kms_(kms), fs_id_(std::move(filesystem_id_hex)), key_id_(std::move(key_id)) {}

  struct NewFile {
    crypto::FileHeader header;
    FileKey key;
  };
  // Errors are -errno values (EACCES for a refused key, EIO otherwise),
  // logged once naming `label` and the KMS's reason.
  Result<NewFile, int> create(const std::string& label);
  Result<FileKey, int> open(const crypto::FileHeader& header, const std::string& label);

  keyclient::EncryptionContext context_for(const crypto::FileId& id) const;

 private:
  keyclient::KeyService& kms_;
  std::string fs_id_;
  std::string key_id_;
};

}  // namespace kmsfs::fs

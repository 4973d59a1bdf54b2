#pragma once
// KMS errors, named exactly as AWS KMS names them (the "__type" of an AWS
// error response), so that callers and the wire protocol speak AWS.

#include <string>
#include <string_view>

#include "crypto/result.h"

namespace kmsfs::keyclient {

enum class KmsErrorCode {
  NotFoundException,
  DisabledException,
  KMSInvalidStateException,
  InvalidCiphertextException,
  IncorrectKeyException,
  AccessDeniedException,
  AlreadyExistsException,
  ValidationException,
  InvalidKeyUsageException,
  InvalidAliasNameException,
  InvalidArnException,
  LimitExceededException,
  MalformedPolicyDocumentException,
  UnsupportedOperationException,
  KeyUnavailableException,
  DependencyTimeoutException,
  KMSInternalException,
  // #3
  IncorrectKeyMaterialException,
  InvalidImportTokenException,
  ExpiredImportTokenException,
  InvalidGrantIdException,
  InvalidGrantTokenException,
  InvalidMarkerException,
  TagException,
};

std::string_view kms_error_name(KmsErrorCode code);
// Unknown names map to KMSInternalException.
KmsErrorCode kms_error_from_name(std::string_view name);

struct KmsError {
  KmsErrorCode code = KmsErrorCode::KMSInternalException;
  std::string message;

  std::string_view name() const { return kms_error_name(code); }
  // "NotFoundException: Alias alias/x is not found."
  std::string to_string() const;
};

template <class T>
using KmsResult = Result<T, KmsError>;

inline Unexpected<KmsError> kms_error(KmsErrorCode code, std::string message) {
  return Unexpected<KmsError>(KmsError{code, std::move(message)});
}

}  // namespace kmsfs::keyclient

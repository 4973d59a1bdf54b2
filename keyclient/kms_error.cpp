#include "keyclient/kms_error.h"

#include <array>
#include <utility>

namespace kmsfs::keyclient {

namespace {
constexpr std::array<std::pair<KmsErrorCode, std::string_view>, 24> kNames{{
    {KmsErrorCode::NotFoundException, "NotFoundException"},
    {KmsErrorCode::DisabledException, "DisabledException"},
    {KmsErrorCode::KMSInvalidStateException, "KMSInvalidStateException"},
    {KmsErrorCode::InvalidCiphertextException, "InvalidCiphertextException"},
    {KmsErrorCode::IncorrectKeyException, "IncorrectKeyException"},
    {KmsErrorCode::AccessDeniedException, "AccessDeniedException"},
    {KmsErrorCode::AlreadyExistsException, "AlreadyExistsException"},
    {KmsErrorCode::ValidationException, "ValidationException"},
    {KmsErrorCode::InvalidKeyUsageException, "InvalidKeyUsageException"},
    {KmsErrorCode::InvalidAliasNameException, "InvalidAliasNameException"},
    {KmsErrorCode::InvalidArnException, "InvalidArnException"},
    {KmsErrorCode::LimitExceededException, "LimitExceededException"},
    {KmsErrorCode::MalformedPolicyDocumentException, "MalformedPolicyDocumentException"},
    {KmsErrorCode::UnsupportedOperationException, "UnsupportedOperationException"},
    {KmsErrorCode::KeyUnavailableException, "KeyUnavailableException"},
    {KmsErrorCode::DependencyTimeoutException, "DependencyTimeoutException"},
    {KmsErrorCode::KMSInternalException, "KMSInternalException"},
    {KmsErrorCode::IncorrectKeyMaterialException, "IncorrectKeyMaterialException"},
    {KmsErrorCode::InvalidImportTokenException, "InvalidImportTokenException"},
    {KmsErrorCode::ExpiredImportTokenException, "ExpiredImportTokenException"},
    {KmsErrorCode::InvalidGrantIdException, "InvalidGrantIdException"},
    {KmsErrorCode::InvalidGrantTokenException, "InvalidGrantTokenException"},
    {KmsErrorCode::InvalidMarkerException, "InvalidMarkerException"},
    {KmsErrorCode::TagException, "TagException"},
}};
}  // namespace

std::string_view kms_error_name(KmsErrorCode code) {
  for (const auto& [c, n] : kNames) {
    if (c == code) return n;
  }
  return "KMSInternalException";
}

KmsErrorCode kms_error_from_name(std::string_view name) {
  for (const auto& [c, n] : kNames) {
    if (n == name) return c;
  }
  return KmsErrorCode::KMSInternalException;
}

std::string KmsError::to_string() const {
  return std::string(name()) + ": " + message;
}

}  // namespace kmsfs::keyclient

// The audit log's durability classes (#6): a data-plane record is in the
// file when append() returns (it survives a kill -9 of the writer) and is
// fdatasynced by the flusher within the interval; a durable record is
// fdatasynced before append() returns; the chain stays verifiable.

#include "keyclient/audit_log.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "keyclient/kms_core.h"
#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

// No checkpoint is due with checkpoint_every = 1000000, so the log never
// asks this HSM for anything.
class NoHsm final : public Hsm {
 public:
  HsmResult<void> generate_aes_key(const std::string&, std::size_t) override { return refuse(); }
  HsmResult<bool> key_exists(const std::string&) override { return unexpected(err()); }
  HsmResult<void> destroy_key(const std::string&) override { return refuse(); }
  HsmResult<std::vector<std::uint8_t>> encrypt_gcm(const std::string&, std::span<const std::uint8_t>,
                                                   std::span<const std::uint8_t>,
                                                   std::span<const std::uint8_t>) override {
    return unexpected(err());
  }
  HsmResult<crypto::SecureBuffer> decrypt_gcm(const std::string&, std::span<const std::uint8_t>,
                                              std::span<const std::uint8_t>, std::span<const std::uint8_t>) override {
    return unexpected(err());
  }
  HsmResult<void> generate_random(std::span<std::uint8_t>) override { return refuse(); }

 private:
  static HsmError err() { return HsmError{HsmError::Kind::DeviceError, 0, "no HSM in this test"}; }
  static HsmResult<void> refuse() { return unexpected(err()); }
};

AuditLogOptions options(std::chrono::milliseconds interval) {
  AuditLogOptions o;
  o.checkpoint_every = 1000000;
  o.sync_interval = interval;
  return o;
}

json event(const std::string& name, int i) {
  return json{{"eventName", name}, {"eventType", "AwsApiCall"}, {"n", i}};
}

std::vector<json> records_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<json> out;
  for (std::string l; std::getline(in, l);) out.push_back(json::parse(l, nullptr, false));
  return out;
}

TEST(AuditLog, BufferedRecordIsInTheFileWhenAppendReturnsButNotYetSynced) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  AuditLog log(dir, hsm, options(1h));
  ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  auto recs = records_of(log.path());
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0]["eventName"], "Decrypt");
  EXPECT_EQ(recs[0]["seq"], 1);
  const auto c = log.counters();
  EXPECT_EQ(c.appended, 1u);
  EXPECT_EQ(c.synced, 0u) << "a data-plane record must not wait for an fdatasync";
  EXPECT_EQ(c.fdatasyncs, 0u);
}

TEST(AuditLog, DurableRecordIsSyncedBeforeAppendReturns) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  AuditLog log(dir, hsm, options(1h));
  ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  ASSERT_TRUE(log.append(event("DisableKey", 2), AuditDurability::Durable));
  const auto c = log.counters();
  EXPECT_EQ(c.appended, 2u);
  EXPECT_EQ(c.synced, 2u);  // one fdatasync covers the buffered record too
  EXPECT_EQ(c.fdatasyncs, 1u);
}

TEST(AuditLog, ZeroIntervalSyncsEveryRecord) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  AuditLog log(dir, hsm, options(0ms));
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(log.append(event("Decrypt", i), AuditDurability::Buffered));
    EXPECT_EQ(log.counters().synced, static_cast<std::uint64_t>(i + 1));
  }
}

TEST(AuditLog, FlusherSyncsBufferedRecordsWithinTheInterval) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  AuditLog log(dir, hsm, options(50ms));
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(log.append(event("GenerateDataKey", i), AuditDurability::Buffered));
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (log.counters().synced < 50 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
  const auto c = log.counters();
  EXPECT_EQ(c.synced, 50u);
  EXPECT_LT(c.fdatasyncs, 50u) << "records appended together share an fdatasync";
}

TEST(AuditLog, ConcurrentAppendersKeepOneChain) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  {
    AuditLog log(dir, hsm, options(20ms));
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 100; ++i) {
          auto d = (i % 10 == 0) ? AuditDurability::Durable : AuditDurability::Buffered;
          ASSERT_TRUE(log.append(event("Decrypt", t * 1000 + i), d));
        }
      });
    }
    for (auto& th : threads) th.join();
  }
  NoHsm again;
  AuditLog reader(dir, again, options(1h));
  auto v = reader.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->records, 400u);
}

// A child process appends buffered records (no fdatasync: the interval is an
// hour), says so, and is killed with SIGKILL: its destructor never runs, yet
// every record it returned from is in the file and the chain continues.
TEST(AuditLog, RecordsReturnedSurviveKillOfTheWriter) {
  const std::string dir = test::make_temp_dir("audit");
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    NoHsm hsm;
    AuditLog log(dir, hsm, options(1h));
    bool ok = true;
    for (int i = 0; i < 20; ++i) ok = ok && log.append(event("GenerateDataKey", i), AuditDurability::Buffered).has_value();
    const char c = ok ? 'y' : 'n';
    (void)!::write(fds[1], &c, 1);
    for (;;) ::pause();
  }
  ::close(fds[1]);
  char c = 0;
  ASSERT_EQ(::read(fds[0], &c, 1), 1);
  ::close(fds[0]);
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));
  ASSERT_EQ(c, 'y');

  auto recs = records_of(dir + "/audit.log");
  ASSERT_EQ(recs.size(), 20u);
  EXPECT_EQ(recs.back()["seq"], 20);
  NoHsm hsm;
  AuditLog log(dir, hsm, options(1h));
  ASSERT_TRUE(log.append(event("Decrypt", 99), AuditDurability::Durable));
  auto v = log.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->records, 21u);
}

// A crash in the middle of a write(2) can leave a partial last line: the
// next record starts on a fresh line and chains to the last complete one.
// A writer killed inside its append's write(2) leaves part of a record
// (the kernel stops at a page boundary): verify reports it and stays valid;
// the next append cuts it off and chains to the last complete record, also
// when that append is torn again.
TEST(AuditLog, RecordTornByAKillIsCutOffByTheNextAppend) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  {
    AuditLog log(dir, hsm, options(1h));
    ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  }
  const std::string path = dir + "/audit.log";
  const auto first = records_of(path).at(0);
  const std::string torn = R"({"eventName":"Decrypt","seq":2,"prevH)";
  {
    std::ofstream out(path, std::ios::app);
    out << torn;
  }
  AuditLog log(dir, hsm, options(1h));
  auto before = log.verify();
  ASSERT_TRUE(before);
  EXPECT_TRUE(before->ok) << before->problem;
  EXPECT_EQ(before->torn_tail_bytes, torn.size());
  EXPECT_EQ(before->records, 1u);
  ASSERT_TRUE(log.append(event("Encrypt", 2), AuditDurability::Buffered));
  {
    std::ifstream in(path);
    std::vector<std::string> lines;
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    ASSERT_EQ(lines.size(), 2u);
    json rec = json::parse(lines[1]);
    EXPECT_EQ(rec["seq"], 2);
    EXPECT_EQ(rec["prevHash"], first["hash"]);
  }
  // Torn twice in a row: the second partial record is cut off as well.
  {
    std::ofstream out(path, std::ios::app);
    out << torn;
  }
  AuditLog again(dir, hsm, options(1h));
  ASSERT_TRUE(again.append(event("Encrypt", 3), AuditDurability::Buffered));
  auto v = again.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->torn_tail_bytes, 0u);
  EXPECT_EQ(v->records, 3u);
  // A partial record on a line of its own (an edit, or a log that could
  // not be cut) still fails verify, naming the line, and the appender
  // refuses to chain past it.
  {
    std::ofstream out(path, std::ios::app);
    out << torn << "\n";
  }
  EXPECT_FALSE(again.append(event("Encrypt", 4), AuditDurability::Buffered));
  auto bad = again.verify();
  ASSERT_TRUE(bad);
  EXPECT_FALSE(bad->ok);
  EXPECT_EQ(bad->line, 4u);
}

// The same log written by another process (another AuditLog on the same
// directory) between this object's appends: the tail is re-read, so the
// chain stays one chain.
TEST(AuditLog, AppendsOfAnotherWriterAreChainedOnto) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm h1, h2;
  AuditLog a(dir, h1, options(1h));
  AuditLog b(dir, h2, options(1h));
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(a.append(event("Decrypt", i), AuditDurability::Buffered));
    ASSERT_TRUE(b.append(event("Encrypt", i), AuditDurability::Buffered));
  }
  auto v = a.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->records, 10u);
}

// Through the core: calls that change key state, and calls whose response
// carries plaintext, are durable before they return; other data-plane calls
// are not waited for (issue #3: "the log is fsynced before a response that
// carries plaintext"). With audit_sync_plaintext off, plaintext calls are
// left to the flusher too.
TEST(KmsCoreAudit, StateChangesAndPlaintextResponsesAreSyncedOtherCallsBuffered) {
  for (const bool sync_plaintext : {true, false}) {
    SCOPED_TRACE(sync_plaintext ? "audit_sync_plaintext on" : "audit_sync_plaintext off");
    const std::string state = test::make_temp_dir("auditcore");
    KmsCoreOptions opts;
    opts.audit_sync_interval = std::chrono::hours(1);
    opts.audit_sync_plaintext = sync_plaintext;
    KmsCore core(state, test::open_test_hsm(test::unique_token_label()), system_clock_now, opts);
    const CallerIdentity me = CallerIdentity::of_this_process();
    CreateKeyRequest ck;
    auto key = core.create_key(me, ck);
    ASSERT_TRUE(key);
    auto s1 = core.audit_sync_state();
    EXPECT_EQ(s1.synced, s1.appended) << "CreateKey must be durable before it returns";

    GenerateDataKeyRequest g;
    g.key_id = key->key_metadata.key_id;
    g.key_spec = "AES_256";
    auto dk = core.generate_data_key(me, g);
    ASSERT_TRUE(dk);
    DecryptRequest d;
    d.ciphertext_blob = dk->ciphertext_blob;
    ASSERT_TRUE(core.decrypt(me, d));
    auto s2 = core.audit_sync_state();
    EXPECT_EQ(s2.appended, s1.appended + 2);
    if (sync_plaintext) {
      EXPECT_EQ(s2.synced, s2.appended) << "GenerateDataKey and Decrypt hand out plaintext: synced first";
    } else {
      EXPECT_EQ(s2.synced, s1.synced) << "plaintext records are left to the flusher";
    }
    // An Encrypt's response carries no plaintext: never waited for.
    EncryptRequest e;
    e.key_id = key->key_metadata.key_id;
    e.plaintext = crypto::SecureBuffer::from_string("hello");
    ASSERT_TRUE(core.encrypt(me, e));
    auto s3 = core.audit_sync_state();
    EXPECT_EQ(s3.appended, s2.appended + 1);
    EXPECT_EQ(s3.synced, s2.synced) << "an Encrypt record is left to the flusher";
    // Every record is in the file all the same.
    const std::string text = test::read_text(state + "/audit.log");
    EXPECT_NE(text.find("\"eventName\":\"GenerateDataKey\""), std::string::npos);
    EXPECT_NE(text.find("\"eventName\":\"Decrypt\""), std::string::npos);
    EXPECT_NE(text.find("\"eventName\":\"Encrypt\""), std::string::npos);

    auto dis = core.disable_key(me, json{{"KeyId", key->key_metadata.key_id}});
    ASSERT_TRUE(dis) << dis.error().to_string();
    auto s4 = core.audit_sync_state();
    EXPECT_EQ(s4.synced, s4.appended) << "DisableKey must be durable before it returns";
  }
}

// After a checkpoint the flusher writes the head (MACed by the appender, so
// the flusher never calls the HSM) once the log is synced up to it; at
// close the head names the last record. `audit verify` checks both.
TEST(AuditLog, FlusherWritesTheHeadAfterACheckpoint) {
  const std::string dir = test::make_temp_dir("audit");
  auto hsm = test::open_test_hsm(test::unique_token_label());
  AuditLogOptions o;
  o.checkpoint_every = 8;
  o.sync_interval = 20ms;
  {
    AuditLog log(dir, *hsm, o);
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(log.append(event("Decrypt", i), AuditDurability::Buffered));
    const std::string head_path = dir + "/audit.head";
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    json head;
    while (std::chrono::steady_clock::now() < deadline) {
      if (::access(head_path.c_str(), F_OK) == 0) {
        head = json::parse(test::read_text(head_path), nullptr, false);
        if (head.is_object()) break;
      }
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_TRUE(head.is_object()) << "no head written after a checkpoint";
    EXPECT_EQ(head["seq"], 8);  // record 7 + its checkpoint (seq 8)
    EXPECT_GE(log.counters().synced, 7u);
  }
  auto head = json::parse(test::read_text(dir + "/audit.head"));
  EXPECT_EQ(head["seq"], 11);  // 10 records + 1 checkpoint, written at close
  AuditLog again(dir, *hsm, o);
  auto v = again.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->checkpoints, 2u);  // the checkpoint record and the head
}

// Hostile or edited content of the trail's files (found by fuzz_audit_log
// and review; each once threw nlohmann::type_error out of kmsctl/kmsd): it is
// reported, naming the line, and nothing throws.
TEST(AuditLog, HeadWithFieldsOfOtherTypesIsMalformed) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  AuditLog log(dir, hsm, options(1h));
  ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  for (const std::string head : {R"({"seq":"x","hash":1,"mac":2})", "5", R"({"seq":-1,"hash":"a","mac":"b"})"}) {
    SCOPED_TRACE(head);
    test::write_text(dir + "/audit.head", head);
    KmsResult<AuditVerifyReport> v = AuditVerifyReport{};
    EXPECT_NO_THROW(v = log.verify());
    ASSERT_TRUE(v);
    EXPECT_FALSE(v->ok);
    EXPECT_EQ(v->problem, dir + "/audit.head is malformed");
  }
}

TEST(AuditLog, LineThatIsNotAnObjectIsNamedAndSkippedBySearch) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  AuditLog log(dir, hsm, options(1h));
  ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  {
    std::ofstream out(log.path(), std::ios::app);
    out << "5\n" << R"({"eventName":"Decrypt","resources":[1],"requestParameters":{"keyId":5}})" << "\n"
        << R"({"eventName":"Decrypt","resources":{"ARN":"k"},"eventType":1,"eventTime":5})" << "\n";
  }
  KmsResult<AuditVerifyReport> v = AuditVerifyReport{};
  EXPECT_NO_THROW(v = log.verify());
  ASSERT_TRUE(v);
  EXPECT_FALSE(v->ok);
  EXPECT_EQ(v->line, 2u);
  EXPECT_EQ(v->problem, "line 2: not a JSON record (edited or truncated)");
  AuditSearch by_key;
  by_key.key_id = "k";
  KmsResult<std::vector<json>> found = std::vector<json>{};
  EXPECT_NO_THROW(found = log.search(by_key));
  ASSERT_TRUE(found);
  EXPECT_TRUE(found->empty()) << "resources that are no array of objects name no key";
  AuditSearch since;
  since.since = "2026";
  EXPECT_NO_THROW(found = log.search(since));
  ASSERT_TRUE(found);
  EXPECT_TRUE(found->empty()) << "an eventTime that is no string is no time";
  AuditSearch decrypts;
  decrypts.event_name = "Decrypt";
  EXPECT_NO_THROW(found = log.search(decrypts));
  ASSERT_TRUE(found);
  EXPECT_EQ(found->size(), 3u) << "the non-object line is skipped";
}

// The appender chains onto the last line: one whose seq or hash has another
// type is not a chained record, and the append fails with that reason.
TEST(AuditLog, LastLineWithFieldsOfOtherTypesFailsTheAppend) {
  const std::string dir = test::make_temp_dir("audit");
  NoHsm hsm;
  {
    AuditLog log(dir, hsm, options(1h));
    ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  }
  for (const std::string last : {R"({"seq":"x","hash":1})", R"({"seq":2.5,"hash":"a"})", "7"}) {
    SCOPED_TRACE(last);
    {
      std::ofstream out(dir + "/audit.log", std::ios::app);
      out << last << "\n";
    }
    AuditLog log(dir, hsm, options(1h));
    KmsResult<void> r;
    EXPECT_NO_THROW(r = log.append(event("Encrypt", 2), AuditDurability::Buffered));
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("is not a chained record"), std::string::npos) << r.error().message;
  }
}

// A head writer reads the old head only to keep a newer one: a malformed
// one is replaced.
TEST(AuditLog, MalformedHeadIsReplacedByTheNextHeadWrite) {
  const std::string dir = test::make_temp_dir("audit");
  auto hsm = test::open_test_hsm(test::unique_token_label());
  AuditLog log(dir, *hsm, options(1h));
  ASSERT_TRUE(log.append(event("Decrypt", 1), AuditDurability::Buffered));
  for (const std::string head : {"5", R"({"seq":"x","hash":1,"mac":2})", R"({"seq":99})"}) {
    SCOPED_TRACE(head);
    test::write_text(dir + "/audit.head", head);
    KmsResult<void> w;
    EXPECT_NO_THROW(w = log.write_head());
    ASSERT_TRUE(w) << w.error().message;
    auto v = log.verify();
    ASSERT_TRUE(v);
    EXPECT_TRUE(v->ok) << v->problem;
    EXPECT_EQ(v->checkpoints, 1u) << "the head was rewritten and verifies";
  }
}

}  // namespace
}  // namespace kmsfs::keyclient

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

// --- the append's check against the head ----------------------------------

std::vector<json> tamper_records(const std::string& path) {
  std::vector<json> out;
  for (auto& r : records_of(path)) {
    if (r.is_object() && r.value("eventName", std::string()) == "AuditLogTampered") out.push_back(r);
  }
  return out;
}

void cut_lines(const std::string& path, std::size_t keep) {
  std::ifstream in(path);
  std::string kept;
  std::string l;
  for (std::size_t i = 0; i < keep && std::getline(in, l); ++i) kept += l + "\n";
  in.close();
  test::write_text(path, kept);
}

AuditLogOptions no_checkpoints() {
  AuditLogOptions o;
  o.checkpoint_every = 1000;  // heads only from write_head() and close: where the test puts them
  o.sync_interval = 1h;
  return o;
}

// Records cut off the end below the head: the next append (another
// object, as a new process) writes an AuditLogTampered record naming the
// head and the tail it found, then the caller's record; the head is not
// moved back; later appends of yet other objects do not record the same
// cut again; verify names the record. The call is not refused.
TEST(AuditLog, CutFoundByAnAppendIsRecordedOnceAndTheHeadStays) {
  const std::string dir = test::make_temp_dir("audit");
  auto hsm = test::open_test_hsm(test::unique_token_label());
  {
    AuditLog log(dir, *hsm, no_checkpoints());
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(log.append(event("Decrypt", i), AuditDurability::Buffered));
  }
  const std::string head_text = test::read_text(dir + "/audit.head");
  const json head = json::parse(head_text);
  ASSERT_EQ(head["seq"], 10);
  const std::string path = dir + "/audit.log";
  const json kept_tail = records_of(path).at(5);
  cut_lines(path, 6);
  {
    AuditLog log(dir, *hsm, no_checkpoints());
    ASSERT_TRUE(log.append(event("Encrypt", 99), AuditDurability::Buffered));
  }
  auto recs = records_of(path);
  ASSERT_EQ(recs.size(), 8u);
  EXPECT_EQ(recs[6]["eventName"], "AuditLogTampered");
  EXPECT_EQ(recs[6]["errorCode"], "AuditLogTampered");
  EXPECT_EQ(recs[6]["readOnly"], false);
  EXPECT_EQ(recs[6]["seq"], 7);
  EXPECT_EQ(recs[6]["serviceEventDetails"]["headSeq"], 10);
  EXPECT_EQ(recs[6]["serviceEventDetails"]["headHash"], head["hash"]);
  EXPECT_EQ(recs[6]["serviceEventDetails"]["tailSeq"], 6);
  EXPECT_EQ(recs[6]["serviceEventDetails"]["tailHash"], kept_tail["hash"]);
  EXPECT_EQ(recs[7]["n"], 99) << "the caller's record follows";
  EXPECT_EQ(test::read_text(dir + "/audit.head"), head_text) << "the head never moves back";

  for (int i = 0; i < 3; ++i) {
    AuditLog log(dir, *hsm, no_checkpoints());
    ASSERT_TRUE(log.append(event("Encrypt", 100 + i), AuditDurability::Buffered));
  }
  EXPECT_EQ(tamper_records(path).size(), 1u) << "the same cut is recorded once";
  EXPECT_EQ(json::parse(test::read_text(dir + "/audit.head"))["seq"], 11) << "past the old head: it moves on";
  AuditLog reader(dir, *hsm, no_checkpoints());
  auto v = reader.verify();
  ASSERT_TRUE(v);
  EXPECT_FALSE(v->ok);
  EXPECT_EQ(v->line, 7u);
  EXPECT_NE(v->problem.find("line 7 (seq 7): the log had been truncated before this record: cut back from seq 10 to seq 6"),
            std::string::npos)
      << v->problem;
}

// A head whose HSM MAC does not verify vouches for nothing: a log shorter
// than it is not recorded as cut (`audit verify` reports the head).
TEST(AuditLog, HeadWithAForgedMacIsNotTrustedByTheAppend) {
  const std::string dir = test::make_temp_dir("audit");
  auto hsm = test::open_test_hsm(test::unique_token_label());
  {
    AuditLog log(dir, *hsm, no_checkpoints());
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(log.append(event("Decrypt", i), AuditDurability::Buffered));
  }
  test::write_text(dir + "/audit.head", json{{"seq", 50}, {"hash", std::string(64, 'a')}, {"mac", std::string(64, 'b')}}.dump());
  AuditLog log(dir, *hsm, no_checkpoints());
  ASSERT_TRUE(log.append(event("Decrypt", 3), AuditDurability::Buffered));
  EXPECT_TRUE(tamper_records(log.path()).empty());
  auto v = log.verify();
  ASSERT_TRUE(v);
  EXPECT_FALSE(v->ok);
  EXPECT_NE(v->problem.find("the HSM MAC does not verify (the head was edited)"), std::string::npos) << v->problem;
}

// Two processes' worth of appenders (two objects, two HSM sessions) taking
// turns on one log, with heads written by both in between: each append
// finds the other's tail, at the head's seq or past it, and compares. An
// intact log is never called tampered.
TEST(AuditLog, AlternatingWritersWithHeadsAreNoTampering) {
  const std::string dir = test::make_temp_dir("audit");
  const std::string token = test::unique_token_label();
  auto h1 = test::open_test_hsm(token);
  auto h2 = test::open_test_hsm(token);
  AuditLogOptions o;
  o.checkpoint_every = 4;
  o.sync_interval = 1h;  // heads only from write_head() and close, where the test puts them
  {
    AuditLog a(dir, *h1, o);
    AuditLog b(dir, *h2, o);
    for (int i = 0; i < 30; ++i) {
      ASSERT_TRUE(a.append(event("Decrypt", i), AuditDurability::Buffered));
      if (i % 3 == 0) {
        ASSERT_TRUE(a.write_head());  // b's next append finds its tail at the head's seq
      }
      ASSERT_TRUE(b.append(event("Encrypt", i), AuditDurability::Durable));
      if (i % 5 == 1) {
        ASSERT_TRUE(b.write_head());  // a's next append: the head one record back, or at the tail
      }
    }
  }
  EXPECT_TRUE(tamper_records(dir + "/audit.log").empty());
  AuditLog reader(dir, *h1, o);
  auto v = reader.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->records, 60u + 60u / 3);  // 60 events, a checkpoint every 4th record
}

// A kill inside an append's write(2) tears only the record being written,
// after every record a head can name (the head is written after the sync
// of the records it names): cutting the torn bytes off is no tampering,
// also when the head names the last complete record.
TEST(AuditLog, RecordTornByAKillAfterTheHeadIsNoTampering) {
  const std::string dir = test::make_temp_dir("audit");
  auto hsm = test::open_test_hsm(test::unique_token_label());
  {
    AuditLog log(dir, *hsm, no_checkpoints());
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(log.append(event("Decrypt", i), AuditDurability::Buffered));
  }
  ASSERT_EQ(json::parse(test::read_text(dir + "/audit.head"))["seq"], 5);
  const std::string path = dir + "/audit.log";
  {
    std::ofstream out(path, std::ios::app);
    out << R"({"eventName":"Decrypt","seq":6,"prevH)";
  }
  AuditLog log(dir, *hsm, no_checkpoints());
  ASSERT_TRUE(log.append(event("Encrypt", 6), AuditDurability::Buffered));
  EXPECT_TRUE(tamper_records(path).empty());
  auto v = log.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_EQ(v->records, 6u);
}

// The same with a real kill: a child appends without end (no HSM needed:
// no checkpoint falls due) and is killed with SIGKILL wherever it is; the
// head written before names a record it cannot have touched. The next
// append cuts what the kill tore and finds the log intact.
TEST(AuditLog, WriterKilledMidAppendIsNoTampering) {
  const std::string dir = test::make_temp_dir("audit");
  auto hsm = test::open_test_hsm(test::unique_token_label());
  {
    AuditLog log(dir, *hsm, no_checkpoints());
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(log.append(event("Decrypt", i), AuditDurability::Buffered));
  }
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    NoHsm none;
    AuditLog log(dir, none, options(1h));
    // Records of 1.5 KiB: a write often straddles a page boundary, where a
    // kill stops it.
    const std::string pad(1500, 'x');
    for (int i = 0;; ++i) {
      json e = event("GenerateDataKey", i);
      e["pad"] = pad;
      if (!log.append(e, AuditDurability::Buffered)) ::_exit(1);
      if (i == 20) {
        const char c = 'y';
        (void)!::write(fds[1], &c, 1);
      }
    }
  }
  ::close(fds[1]);
  char c = 0;
  ASSERT_EQ(::read(fds[0], &c, 1), 1);
  ::close(fds[0]);
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));

  AuditLog log(dir, *hsm, no_checkpoints());
  ASSERT_TRUE(log.append(event("Encrypt", 1), AuditDurability::Buffered));
  EXPECT_TRUE(tamper_records(log.path()).empty());
  auto v = log.verify();
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->ok) << v->problem;
  EXPECT_GE(v->records, 5u + 21u + 1u);
}

}  // namespace
}  // namespace kmsfs::keyclient

// The readers of the audit trail's text (keyclient/audit_chain.h) over logs
// and heads as the writer writes them and as someone may have edited them:
// every damaged record is reported with its line, nothing throws. The MAC
// is SHA-256 of the text here (the HSM's HMAC in AuditLog).

#include "keyclient/audit_chain.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "crypto/encoding.h"
#include "crypto/sha256.h"

namespace kmsfs::keyclient {
namespace {

using json = nlohmann::json;

const std::string kKey = "00000000-0000-4000-8000-000000000001";
const std::string kArn = "arn:aws:kms:local:000000000000:key/" + kKey;

KmsResult<std::string> fake_mac(const std::string& text) {
  return crypto::to_hex(crypto::sha256(crypto::as_bytes(text)));
}

json event(const std::string& name) {
  return json{{"eventName", name},
              {"eventType", "AwsApiCall"},
              {"eventTime", "2026-11-29T11:11:42Z"},
              {"requestParameters", {{"keyId", kKey}}},
              {"resources", json::array({{{"ARN", kArn}, {"type", "AWS::KMS::Key"}}})}};
}

// A log as AuditLog writes it: the events chained, each record a line.
struct Chain {
  std::string text;
  AuditChainPoint tail{0, kAuditZeroHash};

  void add(json e) {
    auto r = audit_record_text(std::move(e), tail.seq + 1, tail.hash);
    text += r.line;
    tail = r.point;
  }
  void add_checkpoint() {
    add(json{{"eventType", "AuditCheckpoint"},
             {"eventName", "AuditCheckpoint"},
             {"mac", *fake_mac(audit_checkpoint_mac_input(tail.seq + 1, tail.hash))}});
  }
  std::string head() const {
    return json{{"seq", tail.seq}, {"hash", tail.hash}, {"mac", *fake_mac(audit_head_mac_input(tail.seq, tail.hash))}}
               .dump();
  }
};

Chain three_events() {
  Chain c;
  c.add(event("CreateKey"));
  c.add(event("Encrypt"));
  c.add(event("Decrypt"));
  return c;
}

AuditVerifyReport verify(const std::string& log, std::optional<std::string> head = std::nullopt) {
  std::optional<std::string_view> h;
  if (head) h = *head;
  KmsResult<AuditVerifyReport> r = AuditVerifyReport{};
  EXPECT_NO_THROW(r = verify_audit_text(log, h, fake_mac));
  EXPECT_TRUE(r);
  return r ? *r : AuditVerifyReport{};
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A record built field by field is byte for byte the record of the same
// event built as a JSON object: escapes, non-ASCII text, nesting, a key
// given twice, seq and prevHash in their sorted places.
TEST(AuditChain, FieldsAndJsonObjectsMakeTheSameRecord) {
  const std::string odd = std::string("quote\" back\\ tab\t nl\n ctl") + '\x01' + " del\x7f caf\xc3\xa9 /slash";
  json obj{{"eventName", "Decrypt"},
           {"eventTime", "2026-11-30T10:00:00Z"},
           {"zeta", 1},
           {"Alpha", -5},
           {"errorMessage", odd},
           {"nested", {{"b", {1, 2, "x"}}, {"a", nullptr}}},
           {"readOnly", true},
           {"userIdentity", {{"uid", 0}, {"userName", odd}, {"type", "LocalUser"}}}};
  AuditFields f;
  f.add("zeta", "7");  // overwritten below: the last value wins
  f.add_string("eventTime", "2026-11-30T10:00:00Z");
  f.add_string("eventName", "Decrypt");
  f.add("zeta", "1");
  f.add("Alpha", "-5");
  f.add_string("errorMessage", odd);
  f.add("nested", obj["nested"].dump());
  f.add("readOnly", "true");
  f.add("userIdentity", obj["userIdentity"].dump());
  const auto a = audit_record_text(obj, 42, kAuditZeroHash);
  const auto b = audit_record_text(f, 42, kAuditZeroHash);
  EXPECT_EQ(a.line, b.line);
  EXPECT_EQ(a.point.hash, b.point.hash);
  EXPECT_EQ(f.string_value("eventTime"), "2026-11-30T10:00:00Z");
  EXPECT_EQ(f.string_value("zeta"), "");
  EXPECT_EQ(f.string_value("missing"), "");
  // The line is the object plus seq and prevHash as nlohmann dumps it.
  obj["seq"] = 42;
  obj["prevHash"] = kAuditZeroHash;
  std::string expected = obj.dump();
  expected.pop_back();
  EXPECT_EQ(a.line.substr(0, expected.size()), expected);
  EXPECT_EQ(audit_json_string(odd), json(odd).dump());
  EXPECT_EQ(audit_json_string("plain"), "\"plain\"");
  EXPECT_THROW(audit_json_string("bad \xff utf-8"), json::exception);
}

TEST(AuditChain, LogAsWrittenVerifiesWithCheckpointAndHead) {
  Chain c = three_events();
  c.add_checkpoint();
  c.add(event("Decrypt"));
  auto r = verify(c.text, c.head());
  EXPECT_TRUE(r.ok) << r.problem;
  EXPECT_EQ(r.records, 5u);
  EXPECT_EQ(r.last_seq, 5u);
  EXPECT_EQ(r.checkpoints, 2u);  // the checkpoint record and the head
}

TEST(AuditChain, EditedRecordIsNamed) {
  Chain c = three_events();
  const auto at = c.text.find("\"Encrypt\"");
  ASSERT_NE(at, std::string::npos);
  c.text.replace(at, 9, "\"Decrypt\"");
  auto r = verify(c.text);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.line, 2u);
  EXPECT_TRUE(contains(r.problem, "line 2 (seq 2): edited")) << r.problem;
}

// Regression (fuzz_audit_log): a line that is JSON but not an object
// (a number, an array, a string, null) is an edited record of that line.
TEST(AuditChain, LineThatIsNotAnObjectIsNamed) {
  for (const std::string bad : {"5", "[1]", "\"x\"", "null", "true"}) {
    SCOPED_TRACE(bad);
    Chain c = three_events();
    const auto first_nl = c.text.find('\n');
    const std::string log = c.text.substr(0, first_nl + 1) + bad + "\n" + c.text.substr(first_nl + 1);
    auto r = verify(log);
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.line, 2u);
    EXPECT_TRUE(contains(r.problem, "line 2: not a JSON record (edited")) << r.problem;
  }
}

// seq is an unsigned 64-bit integer; a string, a negative number, a float
// or a number past 2^64-1 is an edited record, not a conversion.
TEST(AuditChain, SeqOfAnotherTypeOrOutOfRangeIsNamed) {
  for (const std::string seq : {"\"1\"", "-1", "1.0", "1e0", "18446744073709551616", "null", "{}"}) {
    SCOPED_TRACE(seq);
    const std::string line =
        "{\"seq\":" + seq + ",\"prevHash\":\"" + kAuditZeroHash + "\",\"hash\":\"" + kAuditZeroHash + "\"}\n";
    auto r = verify(line);
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.line, 1u);
    EXPECT_TRUE(contains(r.problem, "line 1: ")) << r.problem;
    EXPECT_TRUE(contains(r.problem, "edited")) << r.problem;
  }
}

// A correctly chained record whose eventType or mac has another type (only
// someone who can rewrite the chain writes one): an ordinary record, or a
// checkpoint whose MAC does not verify. Never an exception.
TEST(AuditChain, ChainedRecordWithFieldsOfOtherTypesDoesNotThrow) {
  Chain c;
  c.add(json{{"eventType", 5}, {"eventName", json::array({"Decrypt"})}});
  auto r = verify(c.text);
  EXPECT_TRUE(r.ok) << r.problem;
  c.add(json{{"eventType", "AuditCheckpoint"}, {"mac", 5}});
  r = verify(c.text);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.line, 2u);
  EXPECT_TRUE(contains(r.problem, "line 2 (seq 2): the checkpoint's HSM MAC does not verify")) << r.problem;
}

// Regression (fuzz_audit_log): a head file with fields of other types, or
// that is no object, is reported as malformed with the head's name.
TEST(AuditChain, HeadOfAnotherShapeIsMalformed) {
  const Chain c = three_events();
  const std::string h = c.tail.hash;
  for (const std::string& head :
       {std::string(R"({"seq":"x","hash":1,"mac":2})"), std::string("5"), std::string("[]"), std::string("null"),
        std::string(R"({"seq":-1,"hash":")") + h + R"(","mac":"00"})",
        std::string(R"({"seq":3.0,"hash":")") + h + R"(","mac":"00"})",
        std::string(R"({"seq":18446744073709551616,"hash":")") + h + R"(","mac":"00"})",
        std::string(R"({"seq":3,"hash":")") + h + R"(","mac":["00"]})",
        std::string(R"({"seq":3,"hash":")") + h + R"("})", std::string("")}) {
    SCOPED_TRACE(head);
    AuditVerifyReport r;
    auto res = verify_audit_text(c.text, std::string_view(head), fake_mac, "STATE/audit.head");
    ASSERT_TRUE(res);
    r = *res;
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.problem, "STATE/audit.head is malformed");
    EXPECT_EQ(r.records, 3u) << "the log itself was read";
  }
}

TEST(AuditChain, HeadAheadOfTheLogIsATruncation) {
  Chain c = three_events();
  const std::string head = c.head();
  const std::string log = c.text.substr(0, c.text.find('\n') + 1);
  auto r = verify(log, head);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.line, 2u);
  EXPECT_TRUE(contains(r.problem, "truncated: the log ends at seq 1")) << r.problem;
}

TEST(AuditChain, TailLineOfAnotherShapeIsNotAChainedRecord) {
  Chain c;
  c.add(event("Decrypt"));
  const std::string line = c.text.substr(0, c.text.size() - 1);
  auto p = parse_audit_tail_line(line);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->seq, 1u);
  EXPECT_EQ(p->hash, c.tail.hash);
  for (const std::string bad : {R"({"seq":"x","hash":1})", R"({"seq":1,"hash":1})", R"({"seq":-1,"hash":"a"})",
                                R"({"seq":1.5,"hash":"a"})", R"({"hash":"a"})", "5", "[1,2]", "", "{"}) {
    SCOPED_TRACE(bad);
    std::optional<AuditChainPoint> q;
    EXPECT_NO_THROW(q = parse_audit_tail_line(bad));
    EXPECT_FALSE(q);
  }
}

TEST(AuditChain, SearchFindsByKeyIdArnEventAndTime) {
  Chain c = three_events();
  c.add_checkpoint();
  AuditSearch q;
  EXPECT_EQ(search_audit_text(c.text, q).size(), 3u) << "checkpoints are not events";
  q.key_id = kKey;
  q.event_name = "Encrypt";
  auto found = search_audit_text(c.text, q);
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found[0]["seq"], 2);
  q = AuditSearch{};
  q.key_id = kArn;
  q.limit = 2;
  EXPECT_EQ(search_audit_text(c.text, q).size(), 2u);
  q = AuditSearch{};
  q.since = "2026-11-30";
  EXPECT_TRUE(search_audit_text(c.text, q).empty());
}

// Regression (fuzz_audit_log): lines that are no object, "resources" that is
// no array or holds no objects, fields of other types: skipped or not
// matched, never thrown.
TEST(AuditChain, SearchSkipsRecordsOfOtherShapes) {
  const std::string log = "5\n[1]\nnull\n"
                          "{\"eventName\":\"Decrypt\",\"resources\":[1,\"x\",null,{\"ARN\":5}]}\n"
                          "{\"eventName\":\"Decrypt\",\"resources\":{\"ARN\":\"" + kArn + "\"}}\n"
                          "{\"eventName\":\"Decrypt\",\"resources\":\"" + kArn + "\",\"requestParameters\":{\"keyId\":5}}\n"
                          "{\"eventType\":1,\"eventName\":[\"Decrypt\"],\"eventTime\":2026}\n"
                          "{\"eventName\":\"Decrypt\",\"eventTime\":\"2026-11-29T11:11:42Z\","
                          "\"resources\":[{\"ARN\":\"" + kArn + "\"}]}\n";
  for (const bool by_key : {false, true}) {
    SCOPED_TRACE(by_key ? "by key" : "by event name");
    AuditSearch q;
    if (by_key) q.key_id = kKey;
    q.event_name = "Decrypt";
    std::vector<json> found;
    EXPECT_NO_THROW(found = search_audit_text(log, q));
    ASSERT_EQ(found.size(), by_key ? 1u : 4u);
    EXPECT_EQ(found.back()["resources"][0]["ARN"], kArn);
  }
  AuditSearch since;
  since.since = "2026";
  EXPECT_EQ(search_audit_text(log, since).size(), 1u) << "an eventTime that is no string is no time";
  AuditSearch all;
  EXPECT_EQ(search_audit_text(log, all).size(), 5u) << "every object that is not a checkpoint";
}

// --- the appender's check against the head ----------------------------------

Chain ten_events() {
  Chain c;
  for (int i = 0; i < 10; ++i) c.add(event(i % 2 ? "Encrypt" : "Decrypt"));
  return c;
}

// The seq and hash of the record on `line` (1-based).
AuditChainPoint point_at(const std::string& log, std::size_t line) {
  std::size_t pos = 0;
  for (std::size_t i = 1; i < line; ++i) pos = log.find('\n', pos) + 1;
  return *parse_audit_tail_line(log.substr(pos, log.find('\n', pos) - pos));
}

TEST(AuditChain, LogEndMatchesTheHeadItContains) {
  const Chain c = ten_events();
  for (std::size_t at : {10u, 9u, 4u, 1u}) {
    SCOPED_TRACE(at);
    auto r = check_audit_end_against_head(c.text, true, c.tail, point_at(c.text, at));
    EXPECT_EQ(r.match, AuditHeadMatch::Consistent);
  }
  // A record torn by a kill after the tail is not a line.
  auto r = check_audit_end_against_head(c.text + "{\"seq\":11,\"prevH", true, c.tail, point_at(c.text, 7));
  EXPECT_EQ(r.match, AuditHeadMatch::Consistent);
}

TEST(AuditChain, LogEndBeforeTheHeadIsACut) {
  const Chain c = ten_events();
  const AuditChainPoint head = c.tail;
  const std::string log = c.text.substr(0, c.text.find('\n') + 1);
  auto r = check_audit_end_against_head(log, true, point_at(log, 1), head);
  EXPECT_EQ(r.match, AuditHeadMatch::Cut);
  EXPECT_EQ(check_audit_end_against_head("", true, AuditChainPoint{0, kAuditZeroHash}, head).match, AuditHeadMatch::Cut);
}

TEST(AuditChain, OtherHashAtTheHeadsSeqIsAFork) {
  const Chain c = ten_events();
  AuditChainPoint head = point_at(c.text, 6);
  const std::string real = head.hash;
  head.hash = std::string(64, 'e');
  auto r = check_audit_end_against_head(c.text, true, c.tail, head);
  EXPECT_EQ(r.match, AuditHeadMatch::Forked);
  EXPECT_EQ(r.found_hash, real);
  head = c.tail;
  head.hash = std::string(64, 'e');
  r = check_audit_end_against_head("", false, c.tail, head);  // at the tail: nothing to read
  EXPECT_EQ(r.match, AuditHeadMatch::Forked);
  EXPECT_EQ(r.found_hash, c.tail.hash);
}

// The window is the file's last bytes: too short a window asks for more;
// the whole log without the record where a gap-free chain has it is for
// `audit verify` to name.
TEST(AuditChain, HeadBeforeTheWindowOrAGapIsNotJudged) {
  const Chain c = ten_events();
  const std::string last_two = c.text.substr(c.text.size() - 2 * (c.text.size() / 10) - 20);
  EXPECT_EQ(check_audit_end_against_head(last_two, false, c.tail, point_at(c.text, 3)).match, AuditHeadMatch::NeedMore);
  EXPECT_EQ(check_audit_end_against_head("", false, c.tail, point_at(c.text, 3)).match, AuditHeadMatch::NeedMore);
  // Record 5 removed: 5 lines before the tail is record 4 now.
  std::string gap = c.text;
  const std::size_t l5 = [&] {
    std::size_t pos = 0;
    for (int i = 1; i < 5; ++i) pos = gap.find('\n', pos) + 1;
    return pos;
  }();
  gap.erase(l5, gap.find('\n', l5) + 1 - l5);
  EXPECT_EQ(check_audit_end_against_head(gap, true, c.tail, point_at(c.text, 5)).match, AuditHeadMatch::Unknown);
  EXPECT_EQ(check_audit_end_against_head(gap, true, c.tail, point_at(c.text, 1)).match, AuditHeadMatch::Unknown);
  // Hostile windows: no line, lines that are no records.
  for (const std::string w : {"", "\n", "\n\n\n\n\n\n\n\n\n\n\n", "5\n[1]\n{\"seq\":-1}\n", "{\"seq\":3,\"hash\":7}\n{}\n"}) {
    SCOPED_TRACE(w);
    AuditHeadCheck r;
    EXPECT_NO_THROW(r = check_audit_end_against_head(w, true, AuditChainPoint{5, "x"}, AuditChainPoint{3, "y"}));
    EXPECT_EQ(r.match, AuditHeadMatch::Unknown);
  }
}

TEST(AuditChain, TamperRecordIsNamedByVerify) {
  Chain c = ten_events();
  const AuditChainPoint head{14, std::string(64, 'a')};
  const AuditChainPoint tail = c.tail;
  c.add(audit_tamper_event(head, tail, AuditHeadCheck{AuditHeadMatch::Cut, {}}, "2026-11-29T11:11:42Z"));
  c.add(event("Decrypt"));
  auto r = verify(c.text);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.line, 11u);
  EXPECT_EQ(r.seq, 11u);
  EXPECT_EQ(r.problem,
            "line 11 (seq 11): the log had been truncated before this record: cut back from seq 14 to seq 10 "
            "(audit.head said seq 14); records 11 to 14 were removed and their seqs reused");

  Chain f = ten_events();
  const AuditChainPoint fork_head{7, std::string(64, 'b')};
  f.add(audit_tamper_event(fork_head, f.tail, AuditHeadCheck{AuditHeadMatch::Forked, std::string(64, 'c')}, ""));
  r = verify(f.text);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.line, 11u);
  EXPECT_TRUE(contains(r.problem, "line 11 (seq 11): the log had been rewritten before this record: audit.head said "
                                  "seq 7 has hash bbbbbbbbbbbbbbbb..., the log had cccccccccccccccc... there"))
      << r.problem;
}

// Regression guard: an AuditLogTampered record of another shape (only
// someone who can write the log writes one) still fails verify, by its
// line, and throws nothing.
TEST(AuditChain, TamperRecordOfAnotherShapeFailsVerifyWithoutThrowing) {
  for (const json& details : {json(nullptr), json(5), json::array({1}), json{{"headSeq", "x"}, {"tailSeq", -1}},
                             json{{"headSeq", 3}, {"tailSeq", 9}, {"headHash", 1}, {"recordHash", json::object()}}}) {
    SCOPED_TRACE(details.dump());
    Chain c = three_events();
    c.add(json{{"eventName", "AuditLogTampered"}, {"serviceEventDetails", details}});
    auto r = verify(c.text);
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.line, 4u);
    EXPECT_TRUE(contains(r.problem, "line 4 (seq 4): the log had been")) << r.problem;
    bool found = true;
    EXPECT_NO_THROW(found = audit_tamper_recorded(c.text, AuditChainPoint{3, "h"}));
    EXPECT_FALSE(found);
  }
}

TEST(AuditChain, TamperRecordedMatchesOnlyTheSameHead) {
  Chain c = ten_events();
  const AuditChainPoint head{14, std::string(64, 'a')};
  c.add(audit_tamper_event(head, c.tail, AuditHeadCheck{AuditHeadMatch::Cut, {}}, ""));
  c.add(event("Decrypt"));
  EXPECT_TRUE(audit_tamper_recorded(c.text, head));
  EXPECT_FALSE(audit_tamper_recorded(c.text, AuditChainPoint{15, head.hash}));
  EXPECT_FALSE(audit_tamper_recorded(c.text, AuditChainPoint{14, std::string(64, 'b')}));
  EXPECT_FALSE(audit_tamper_recorded(ten_events().text, head));
  // A record that only mentions the name elsewhere is not one.
  Chain d = ten_events();
  d.add(json{{"eventName", "Decrypt"}, {"note", "AuditLogTampered"}, {"serviceEventDetails", {{"headSeq", 14}, {"headHash", head.hash}}}});
  EXPECT_FALSE(audit_tamper_recorded(d.text, head));
}

}  // namespace
}  // namespace kmsfs::keyclient

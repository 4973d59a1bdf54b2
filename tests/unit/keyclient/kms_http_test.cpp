#include "keyclient/kms_http.h"

#include <gtest/gtest.h>

#include <string>

namespace kmsfs::keyclient::http {
namespace {

const std::string kGood =
    "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-amz-json-1.1\r\n"
    "X-Amz-Target: TrentService.ListKeys\r\nContent-Length: 2\r\n\r\n{}";

ParseState feed_all(RequestParser& p, const std::string& s) { return p.feed(s); }

TEST(HttpRequestParser, ParsesACompleteRequest) {
  RequestParser p;
  ASSERT_EQ(feed_all(p, kGood), ParseState::Complete);
  Request r = p.take();
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.target, "/");
  EXPECT_EQ(r.body, "{}");
  EXPECT_TRUE(r.keep_alive);
  EXPECT_EQ(r.header("x-amz-target").value_or(""), "TrentService.ListKeys");
  EXPECT_FALSE(p.has_partial());
}

TEST(HttpRequestParser, ParsesByteByByte) {
  RequestParser p;
  for (std::size_t i = 0; i + 1 < kGood.size(); ++i) {
    ASSERT_EQ(p.feed(kGood.substr(i, 1)), ParseState::NeedMore) << "at byte " << i;
  }
  ASSERT_EQ(p.feed(kGood.substr(kGood.size() - 1)), ParseState::Complete);
  EXPECT_EQ(p.take().body, "{}");
}

TEST(HttpRequestParser, KeepsPipelinedRequests) {
  RequestParser p;
  ASSERT_EQ(p.feed(kGood + kGood), ParseState::Complete);
  (void)p.take();
  EXPECT_TRUE(p.has_partial());
  ASSERT_EQ(p.parse(), ParseState::Complete);
  EXPECT_EQ(p.take().body, "{}");
  EXPECT_EQ(p.parse(), ParseState::NeedMore);
}

TEST(HttpRequestParser, TruncatedBodyNeedsMore) {
  RequestParser p;
  EXPECT_EQ(p.feed(kGood.substr(0, kGood.size() - 1)), ParseState::NeedMore);
  EXPECT_TRUE(p.has_partial());
}

TEST(HttpRequestParser, ConnectionCloseAndHttp10) {
  RequestParser p;
  ASSERT_EQ(p.feed("POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"), ParseState::Complete);
  EXPECT_FALSE(p.take().keep_alive);
  RequestParser q;
  ASSERT_EQ(q.feed("POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n"), ParseState::Complete);
  EXPECT_FALSE(q.take().keep_alive);
  RequestParser k;
  ASSERT_EQ(k.feed("POST / HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"),
            ParseState::Complete);
  EXPECT_TRUE(k.take().keep_alive);
}

TEST(HttpRequestParser, ExpectContinueIsReported) {
  RequestParser p;
  ASSERT_EQ(p.feed("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"), ParseState::NeedMore);
  EXPECT_TRUE(p.wants_continue());
  p.continue_sent();
  EXPECT_FALSE(p.wants_continue());
  EXPECT_EQ(p.feed("abc"), ParseState::Complete);
}

struct Bad {
  const char* name;
  std::string input;
  int status;
};

class HttpRequestParserRejects : public ::testing::TestWithParam<Bad> {};

TEST_P(HttpRequestParserRejects, WithTheRightStatus) {
  RequestParser p(Limits{1024, 4096});
  ASSERT_EQ(p.feed(GetParam().input), ParseState::Error) << GetParam().name;
  EXPECT_EQ(p.error().status, GetParam().status) << p.error().reason;
  EXPECT_FALSE(p.error().reason.empty());
  // Stays in error.
  EXPECT_EQ(p.feed("GET / HTTP/1.1\r\n\r\n"), ParseState::Error);
}

INSTANTIATE_TEST_SUITE_P(
    Malformed, HttpRequestParserRejects,
    ::testing::Values(
        Bad{"Garbage", "\x01\x02\x03 garbage\r\n\r\n", 400},
        Bad{"NoVersion", "POST /\r\n\r\n", 400},
        Bad{"ExtraSpace", "POST  / HTTP/1.1\r\n\r\n", 400},
        Bad{"Http2", "POST / HTTP/2.0\r\nContent-Length: 0\r\n\r\n", 505},
        Bad{"NotHttp", "POST / FTP/1.1\r\n\r\n", 400},
        Bad{"BareLf", "POST / HTTP/1.1\nContent-Length: 0\r\n\r\n", 400},
        Bad{"NoColon", "POST / HTTP/1.1\r\nContent-Length 0\r\n\r\n", 400},
        Bad{"SpaceInName", "POST / HTTP/1.1\r\nContent Length: 0\r\n\r\n", 400},
        Bad{"ObsFold", "POST / HTTP/1.1\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", 400},
        Bad{"NulInValue", std::string("POST / HTTP/1.1\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n", 48), 400},
        Bad{"NoLength", "POST / HTTP/1.1\r\nHost: x\r\n\r\n", 411},
        Bad{"NegativeLength", "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400},
        Bad{"HugeLength", "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400},
        Bad{"ConflictingLengths", "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400},
        Bad{"Chunked", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
        Bad{"BodyTooLarge", "POST / HTTP/1.1\r\nContent-Length: 4097\r\n\r\n", 413},
        Bad{"HeadersTooLarge", "POST / HTTP/1.1\r\nX-A: " + std::string(2000, 'a') + "\r\n\r\n", 431},
        Bad{"EndlessHeaders", "POST / HTTP/1.1\r\nX-A: " + std::string(2000, 'a'), 431}),
    [](const ::testing::TestParamInfo<Bad>& p) { return std::string(p.param.name); });

TEST(HttpResponseParser, ParsesWhatTheWriterWrites) {
  std::string wire = format_response(400, {{"Content-Type", "application/x-amz-json-1.1"}},
                                     R"({"__type":"NotFoundException"})", true);
  ResponseParser p;
  ASSERT_EQ(p.feed(wire), ParseState::Complete);
  Response r = p.take();
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.reason, "Bad Request");
  EXPECT_TRUE(r.keep_alive);
  EXPECT_EQ(r.body, R"({"__type":"NotFoundException"})");
}

TEST(HttpResponseParser, SkipsInterimResponses) {
  ResponseParser p;
  ASSERT_EQ(p.feed("HTTP/1.1 100 Continue\r\n\r\n" + format_response(200, {}, "{}", false)),
            ParseState::Complete);
  Response r = p.take();
  EXPECT_EQ(r.status, 200);
  EXPECT_FALSE(r.keep_alive);
}

TEST(HttpResponseParser, RefusesResponsesWithoutLength) {
  ResponseParser p;
  EXPECT_EQ(p.feed("HTTP/1.1 200 OK\r\n\r\n"), ParseState::Error);
  ResponseParser q;
  EXPECT_EQ(q.feed("HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"), ParseState::Error);
}

TEST(HttpWriter, RequestRoundTripsThroughTheParser) {
  std::string wire = format_request("POST", "/", {{"X-Amz-Target", "TrentService.Decrypt"}}, "{\"a\":1}");
  RequestParser p;
  ASSERT_EQ(p.feed(wire), ParseState::Complete);
  Request r = p.take();
  EXPECT_EQ(r.body, "{\"a\":1}");
  EXPECT_EQ(r.header("Host").value_or(""), "localhost");
}

}  // namespace
}  // namespace kmsfs::keyclient::http

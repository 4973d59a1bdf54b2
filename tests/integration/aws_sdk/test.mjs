// The AWS SDK for JavaScript v3, unchanged, against kmsd: an http.Agent whose
// connections go to kmsd's Unix socket. Run by run.sh:
//   KMSD_SOCKET=/path/kmsd.sock KMSD_OPERATIONS="CreateKey Decrypt ..." node test.mjs
import http from "node:http";
import net from "node:net";
import assert from "node:assert/strict";
import {
  KMSClient, CreateKeyCommand, GenerateDataKeyCommand, DecryptCommand, EncryptCommand,
  ReEncryptCommand, DescribeKeyCommand, NotFoundException, InvalidCiphertextException,
} from "@aws-sdk/client-kms";
import { NodeHttpHandler } from "@smithy/node-http-handler";

const socketPath = process.env.KMSD_SOCKET;
const operations = new Set((process.env.KMSD_OPERATIONS || "").split(/\s+/).filter(Boolean));
assert.ok(socketPath, "KMSD_SOCKET is not set");

class UnixSocketAgent extends http.Agent {
  createConnection(options, callback) {
    return net.connect(socketPath, callback);
  }
}

const client = new KMSClient({
  region: "local",
  endpoint: "http://kmsd.local",
  // SigV4 signatures are computed and sent; kmsd ignores them (the caller
  // is SO_PEERCRED on the socket).
  credentials: { accessKeyId: "AKIDEXAMPLE", secretAccessKey: "unused" },
  maxAttempts: 1,
  requestHandler: new NodeHttpHandler({ httpAgent: new UnixSocketAgent({ keepAlive: true }) }),
});

const context = { "kmsfs:fs": "aws-sdk-test", purpose: "interop" };
let passed = 0;
const step = async (name, fn) => {
  await fn();
  passed++;
  console.log(`ok ${passed} - ${name}`);
};

let keyId, arn, dataKey;
await step("CreateKey", async () => {
  const r = await client.send(new CreateKeyCommand({ Description: "from the AWS SDK for JavaScript v3" }));
  keyId = r.KeyMetadata.KeyId;
  arn = r.KeyMetadata.Arn;
  assert.equal(r.KeyMetadata.KeyState, "Enabled");
  assert.equal(r.KeyMetadata.Description, "from the AWS SDK for JavaScript v3");
});

await step("GenerateDataKey", async () => {
  dataKey = await client.send(new GenerateDataKeyCommand({ KeyId: keyId, KeySpec: "AES_256", EncryptionContext: context }));
  assert.equal(dataKey.Plaintext.length, 32);
  assert.ok(dataKey.CiphertextBlob.length > 32);
  assert.equal(dataKey.KeyId, arn);
});

await step("Decrypt", async () => {
  const r = await client.send(new DecryptCommand({ CiphertextBlob: dataKey.CiphertextBlob, EncryptionContext: context }));
  assert.deepEqual(Buffer.from(r.Plaintext), Buffer.from(dataKey.Plaintext));
  assert.equal(r.KeyId, arn);
});

let encrypted;
await step("Encrypt", async () => {
  encrypted = await client.send(new EncryptCommand({
    KeyId: keyId, Plaintext: Buffer.from("hello from node"), EncryptionContext: context }));
  const r = await client.send(new DecryptCommand({ CiphertextBlob: encrypted.CiphertextBlob, EncryptionContext: context }));
  assert.equal(Buffer.from(r.Plaintext).toString(), "hello from node");
});

if (operations.has("ReEncrypt")) {
  await step("ReEncrypt", async () => {
    const other = await client.send(new CreateKeyCommand({ Description: "re-encrypt target" }));
    const r = await client.send(new ReEncryptCommand({
      CiphertextBlob: encrypted.CiphertextBlob, SourceEncryptionContext: context,
      DestinationKeyId: other.KeyMetadata.KeyId, DestinationEncryptionContext: { moved: "yes" } }));
    assert.equal(r.KeyId, other.KeyMetadata.Arn);
    const back = await client.send(new DecryptCommand({ CiphertextBlob: r.CiphertextBlob, EncryptionContext: { moved: "yes" } }));
    assert.equal(Buffer.from(back.Plaintext).toString(), "hello from node");
  });
} else {
  console.log("# SKIP ReEncrypt: kmsd's dispatch table has no ReEncrypt yet (issue #3)");
}

await step("NotFoundException is a typed SDK error", async () => {
  await assert.rejects(client.send(new DescribeKeyCommand({ KeyId: "alias/does-not-exist" })), (e) => {
    assert.ok(e instanceof NotFoundException, `got ${e.name}: ${e.message}`);
    assert.equal(e.$metadata.httpStatusCode, 400);
    return true;
  });
});

await step("InvalidCiphertextException on a wrong context", async () => {
  await assert.rejects(
    client.send(new DecryptCommand({ CiphertextBlob: dataKey.CiphertextBlob, EncryptionContext: { wrong: "context" } })),
    (e) => {
      assert.ok(e instanceof InvalidCiphertextException, `got ${e.name}: ${e.message}`);
      return true;
    });
});

client.destroy();
console.log(`1..${passed}`);

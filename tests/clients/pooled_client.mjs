// A pooled HTTP client like the ones chat frontends use: `node pooled_client.mjs BASE_URL < requests.json`.
// Sends the JSON list of {method, path, headers, body} on stdin one after another through ONE keep-alive agent
// with a single socket, so a socket the server closed without saying so would be reused and fail, and prints
// a JSON list with {status, headers, body} (body parsed as JSON when it is JSON) or {error: code} for each.
import http from "node:http";

const base = new URL(process.argv[2]);
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function send({ method, path, headers = {}, body }) {
  const payload = body === undefined || body === null ? null : JSON.stringify(body);
  const allHeaders = payload === null ? headers
    : { "content-type": "application/json", "content-length": Buffer.byteLength(payload), ...headers };
  return new Promise((resolve, reject) => {
    const request = http.request(new URL(path, base), { method, headers: allHeaders, agent }, (response) => {
      const chunks = [];
      response.on("data", (chunk) => chunks.push(chunk));
      response.on("error", reject);
      response.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        let parsed = text;
        try { parsed = JSON.parse(text); } catch { /* not JSON: the text itself */ }
        resolve({ status: response.statusCode, headers: response.headers, body: parsed });
      });
    });
    request.on("error", reject);
    request.end(payload ?? undefined);
  });
}

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = [];
for (const request of JSON.parse(input)) {
  results.push(await send(request).catch((err) => ({ error: err.code ?? String(err) })));
}
agent.destroy();
process.stdout.write(JSON.stringify(results) + "\n");

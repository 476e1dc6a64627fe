// Calls to this server's /v1 API: the key (sessionStorage only), errors in OpenAI's shape, server-sent events.

const KEY = "voxtral.apiKey";

export class ServerError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (key) => (key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY)),
};

function headers(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server's own message from an error response (OpenAI's {"error": {"message": ...}}), else the status line.
async function errorOf(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text)?.error?.message;
    if (message) return new ServerError(message, response.status);
  } catch {
    // not JSON: a proxy's page, say; fall through to the status line
  }
  const detail = text && text.length < 300 ? `: ${text}` : "";
  return new ServerError(`HTTP ${response.status} ${response.statusText}${detail}`, response.status);
}

export async function request(path, { method = "GET", body, json, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (json !== undefined) {
    init.headers = headers({ "Content-Type": "application/json" });
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ServerError(`Cannot reach the server (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

// Each `data:` payload of a server-sent event stream, parsed as JSON; stops at `[DONE]`. An event carrying
// `error` (a failure after the response started) is thrown as that error.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ServerError(event.error.message || JSON.stringify(event.error));
      yield event;
    }
  }
}

// Relative to the page, as every URL here: the playground also works behind a proxy that serves the server
// under a path prefix (https://host/voxtral/).
export function realtimeUrl(model) {
  const url = new URL("v1/realtime", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = new URLSearchParams({ intent: "transcription", model }).toString();
  return url.toString();
}

// Browsers cannot set headers on a WebSocket: the key travels as a subprotocol, which OpenAI's servers (and
// this one) accept; the server answers with `realtime`, never echoing the key.
export function realtimeProtocols() {
  const key = apiKey.get();
  return key ? ["realtime", `openai-insecure-api-key.${key}`] : ["realtime"];
}

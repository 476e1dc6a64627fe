// The playground's page: the key, the tabs, and the three tasks (Transcribe, Ask, Live) wired to this server.

import { ServerError, apiKey, events, request } from "./api.js";
import { Recorder, base64, decodeMono, microphoneError, wavBlob } from "./audio.js";
import { LiveSession } from "./live.js";
import { placeholder, showSegments, showText, streamTranscript, utteranceLine } from "./render.js";

const $ = (id) => document.getElementById(id);
const state = { model: null, audio: null, recorder: null, live: null };

// --- errors and status -----------------------------------------------------------------------------------

function showError(error) {
  const message = error instanceof Error ? error.message : String(error);
  $("error").textContent = message;
  $("error").hidden = false;
  if (error instanceof ServerError && error.status === 401) askForKey();
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Runs a task with its button disabled and its Stop button shown (closing the request stops the server's work
// too); any failure ends up in the Error region, never only in the console.
async function task(button, stop, statusId, work) {
  clearError();
  button.disabled = true;
  const controller = new AbortController();
  stop.onclick = () => controller.abort();
  stop.hidden = false;
  const started = performance.now();
  $(statusId).textContent = "Working…";
  try {
    const note = await work(controller.signal);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $(statusId).textContent = `Done in ${seconds} s${note ? ` · ${note}` : ""}`;
  } catch (error) {
    if (error.name === "AbortError") {
      $(statusId).textContent = "Stopped.";
    } else {
      $(statusId).textContent = "Failed: see the error above.";
      showError(error);
    }
  } finally {
    stop.hidden = true;
    button.disabled = false;
    if (document.activeElement === document.body) button.focus(); // Stop had the focus: keep it in the panel
  }
}

// --- key and model ---------------------------------------------------------------------------------------

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").value = apiKey.get();
}

// /ready needs no key and names the model, so the page can show it (and send requests that get the server's
// own answer) before a key is in; /v1/models then tells whether the key works. While the server starts
// (/v1 answers 503 model_not_ready) the page says so and asks again.
async function connect() {
  try {
    const ready = await fetch("ready").then((r) => r.json());
    state.model = ready.model || state.model;
  } catch {
    // a proxy that exposes only /v1: the model comes from /v1/models below
  }
  try {
    const response = await request("v1/models");
    const models = await response.json();
    state.model = models.data[0].id;
    $("server-status").textContent = `Model: ${state.model}`;
    // The server marks the answers of random weights (the built-in demo model): say so where users look.
    $("random-weights").hidden = response.headers.get("x-voxtral-random-weights") !== "true";
    $("key-form").hidden = true;
    clearError();
  } catch (error) {
    if (error.status === 503) {
      $("server-status").textContent = "Starting: the model is loading…";
      setTimeout(connect, 2000);
      return;
    }
    $("server-status").textContent = error.status === 401 ? "Needs an API key" : "Server not reachable";
    showError(error);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey.set($("api-key").value.trim());
  // A safety net: a failure no task caught still reaches the Error region instead of only the console.
window.addEventListener("unhandledrejection", (event) => showError(event.reason ?? "Something failed."));
window.addEventListener("error", (event) => showError(event.error ?? event.message));

connect();
});

// --- tabs (WAI-ARIA tabs: arrow keys move between them) --------------------------------------------------

const tabs = [...document.querySelectorAll('[role="tab"]')];

function selectTab(tab) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  $("audio-card").hidden = tab.id === "tab-live"; // live audio comes from the microphone as it is spoken
}

for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    const index = { Home: 0, End: tabs.length - 1 }[event.key];
    if (step === undefined && index === undefined) return;
    event.preventDefault();
    const next = tabs[index ?? (tabs.indexOf(tab) + step + tabs.length) % tabs.length];
    selectTab(next);
    next.focus();
  });
}

// --- the current audio: a chosen file or a recording -----------------------------------------------------

function setAudio(blob, name, seconds) {
  if (state.audio?.url) URL.revokeObjectURL(state.audio.url);
  state.audio = { blob, name, url: URL.createObjectURL(blob), wav: null };
  $("player").src = state.audio.url;
  $("player").hidden = false;
  const info = (length) => `${name} · ${(blob.size / 1024).toFixed(0)} KB${length ? ` · ${length.toFixed(1)} s` : ""}`;
  $("audio-info").textContent = info(seconds);
  // A file's length comes with the player's metadata (a recording's is known already).
  $("player").onloadedmetadata = () => {
    if (!seconds && Number.isFinite($("player").duration)) $("audio-info").textContent = info($("player").duration);
  };
}

$("audio-file").addEventListener("change", () => {
  const file = $("audio-file").files[0];
  if (file) setAudio(file, file.name);
});

$("record").addEventListener("click", async () => {
  const button = $("record");
  clearError();
  if (state.recorder) return stopRecording(button);
  const recorder = new Recorder();
  try {
    await recorder.start();
  } catch (error) {
    return showError(microphoneError(error));
  }
  state.recorder = recorder;
  button.setAttribute("aria-pressed", "true");
  $("audio-info").textContent = "Recording… press Record again to stop.";
  state.timer = setInterval(() => {
    $("audio-info").textContent = `Recording ${recorder.seconds.toFixed(0)} s… press Record again to stop.`;
  }, 1000);
});

async function stopRecording(button) {
  clearInterval(state.timer);
  const recorder = state.recorder;
  state.recorder = null;
  button.setAttribute("aria-pressed", "false");
  try {
    const { blob, seconds } = await recorder.stop();
    $("audio-file").value = ""; // the recording is the current audio now, not the file chosen before
    setAudio(blob, "recording.wav", seconds);
  } catch (error) {
    $("audio-info").textContent = "No audio yet.";
    showError(error);
  }
}

function currentAudio() {
  if (state.recorder) throw new Error("Stop the recording first (press Record again).");
  if (!state.audio) throw new Error("Choose an audio file or record one first.");
  if (!state.model) throw new Error("Not connected to the server yet.");
  return state.audio;
}

// --- Transcribe ------------------------------------------------------------------------------------------

$("transcribe").addEventListener("click", () =>
  task($("transcribe"), $("transcribe-stop"), "transcribe-status", async (signal) => {
    const audio = currentAudio();
    const format = $("format").value;
    const out = $("transcript");
    out.replaceChildren();
    const form = new FormData();
    form.append("file", audio.blob, audio.name);
    form.append("model", state.model);
    form.append("response_format", format);
    if ($("language").value) form.append("language", $("language").value);
    const stream = format === "text"; // srt, vtt and verbose_json carry times: they arrive whole
    if (stream) form.append("stream", "true");
    out.setAttribute("aria-busy", "true");
    try {
      const response = await request("v1/audio/transcriptions", { method: "POST", body: form, signal });
      if (stream) return await streamTranscript(response, out);
      if (format === "verbose_json") return showSegments(await response.json(), out);
      showText(await response.text(), out);
    } finally {
      out.setAttribute("aria-busy", "false");
    }
  }),
);

// --- Ask -------------------------------------------------------------------------------------------------

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  task($("ask"), $("ask-stop"), "ask-status", async (signal) => {
    const audio = currentAudio();
    const question = $("question").value.trim();
    if (!question) throw new Error("Type a question first.");
    audio.wav ??= base64(await (await wavBlob(await decodeMono(audio.blob))).arrayBuffer());
    const out = $("answer");
    out.replaceChildren();
    const text = document.createElement("p");
    text.className = "streaming";
    out.append(text);
    out.setAttribute("aria-busy", "true");
    try {
      const body = chatBody(audio.wav, question, Number($("max-tokens").value) || undefined);
      const response = await request("v1/chat/completions", { method: "POST", json: body, signal });
      let usage = null;
      for await (const chunk of events(response)) {
        text.textContent += chunk.choices?.[0]?.delta?.content ?? "";
        usage = chunk.usage ?? usage;
        out.scrollTop = out.scrollHeight;
      }
      if (!text.textContent) text.append(placeholder("(empty answer)"));
      return usage ? `${usage.completion_tokens} tokens` : "";
    } finally {
      text.classList.remove("streaming");
      out.setAttribute("aria-busy", "false");
    }
  });
});

function chatBody(wav, question, maxTokens) {
  return {
    model: state.model,
    stream: true,
    max_completion_tokens: maxTokens,
    stream_options: { include_usage: true },
    messages: [
      {
        role: "user",
        content: [
          { type: "input_audio", input_audio: { data: wav, format: "wav" } },
          { type: "text", text: question },
        ],
      },
    ],
  };
}

// --- Live ------------------------------------------------------------------------------------------------

function liveEnded() {
  state.live = null;
  $("live").textContent = "Start live";
  $("live").classList.remove("active");
  $("live").disabled = false;
  $("live-level").firstElementChild.style.transform = "scaleX(0)";
}

$("live").addEventListener("click", async () => {
  const button = $("live");
  if (state.live) {
    button.disabled = true; // until the last utterance's transcript is in
    return state.live.stop();
  }
  clearError();
  if (!state.model) return showError("Not connected to the server yet.");
  const live = new LiveSession({
    utterance: (itemId, startMs) => utteranceLine($("live-transcript"), itemId, startMs),
    status: (text) => ($("live-status").textContent = text),
    level: (peak) => ($("live-level").firstElementChild.style.transform = `scaleX(${Math.min(1, peak * 2)})`),
    error: showError,
    ended: liveEnded,
  });
  state.live = live;
  button.textContent = "Stop live";
  button.classList.add("active");
  $("live-status").textContent = "Connecting…";
  try {
    await live.start(state.model, $("language").value);
  } catch (error) {
    await live.release();
    liveEnded();
    $("live-status").textContent = "Not started.";
    showError(error);
  }
});

// A safety net: a failure no task caught still reaches the Error region instead of only the console.
window.addEventListener("unhandledrejection", (event) => showError(event.reason ?? "Something failed."));
window.addEventListener("error", (event) => showError(event.error ?? event.message));

connect();

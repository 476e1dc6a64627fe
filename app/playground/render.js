// What the page shows: a streamed transcript, srt/vtt text, verbose_json segments with their times, and the
// live transcript's lines (one per utterance, filled as its deltas arrive).

import { events } from "./api.js";

export async function streamTranscript(response, out) {
  const text = document.createElement("p");
  text.className = "streaming";
  out.append(text);
  let usage = null;
  try {
    for await (const event of events(response)) {
      if (event.type === "transcript.text.delta") text.textContent += event.delta;
      if (event.type === "transcript.text.done") {
        text.textContent = event.text;
        usage = event.usage;
      }
      out.scrollTop = out.scrollHeight;
    }
  } finally {
    text.classList.remove("streaming");
  }
  if (!usage) throw new Error("The transcript stream ended before transcript.text.done.");
  if (!text.textContent) text.append(placeholder("(no speech recognised)"));
  return `${usage.output_tokens ?? "?"} tokens`;
}

export function showText(body, out) {
  const pre = document.createElement("pre");
  pre.textContent = body;
  out.append(pre);
  if (!body.trim()) out.append(placeholder("(no cues: no speech recognised)"));
}

export function showSegments(body, out) {
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = `language ${body.language ?? "?"} · ${Number(body.duration ?? 0).toFixed(1)} s`;
  const list = document.createElement("ol");
  list.className = "segments";
  for (const segment of body.segments ?? []) {
    const item = document.createElement("li");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = `${clock(segment.start)} – ${clock(segment.end)}`;
    const words = document.createElement("span");
    words.textContent = segment.text.trim() || "…";
    item.append(time, words);
    list.append(item);
  }
  out.append(meta, list);
  const count = body.segments?.length ?? 0;
  return `${count} segment${count === 1 ? "" : "s"}`;
}

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  return `${String(m).padStart(2, "0")}:${(seconds - m * 60).toFixed(2).padStart(5, "0")}`;
}

export function placeholder(text) {
  const span = document.createElement("span");
  span.className = "muted";
  span.textContent = text;
  return span;
}

// One utterance's line in the region `out`: a handle the live session fills as its events arrive.
export function utteranceLine(out, itemId, startMs) {
  const row = document.createElement("div");
  row.className = "live-row";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = startMs === undefined ? "" : clock(startMs / 1000);
  const line = document.createElement("p");
  line.className = "utterance pending";
  line.dataset.itemId = itemId;
  line.append(placeholder("…"));
  row.append(time, line);
  out.append(row);
  const scroll = () => (out.scrollTop = out.scrollHeight);
  scroll();
  const handle = {
    finished: false,
    // A delta adds its text at once, the line marked streaming (a cursor) until `.completed` makes it final:
    // with a Voxtral Realtime model the deltas come while the speaker is still talking.
    append(delta) {
      if (line.querySelector(".muted")) line.textContent = "";
      line.textContent += delta;
      line.classList.add("streaming");
      scroll();
    },
    done(transcript) {
      handle.finished = true;
      line.className = "utterance completed";
      line.textContent = transcript;
      if (!transcript) line.append(placeholder("(no words)"));
      scroll();
    },
    failed(message) {
      handle.finished = true;
      line.className = "utterance failed";
      line.textContent = `(failed: ${message})`;
    },
  };
  return handle;
}

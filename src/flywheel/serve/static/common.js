// Shared helpers of the flywheel pages: the token, JSON calls, SSE streams, and safe DOM building.
// User text only ever reaches the page through textContent / value (el() below), never innerHTML.
"use strict";

const fw = {
  // Where this page keeps its token: the chat page its user token ("chat"); the labeling and admin pages a labeler's
  // or admin's ("staff"). Kept apart, so that entering a staff token never changes who the chat page chats as.
  tokenKind: "chat",
  token() { return localStorage.getItem("flywheel.token." + fw.tokenKind) || ""; },
  setToken(t) {
    const key = "flywheel.token." + fw.tokenKind;
    if (t) localStorage.setItem(key, t); else localStorage.removeItem(key);
  },
  // The anonymous chat identity: 32 random bytes (base64url) from the browser's CSPRNG, a secret kept in
  // localStorage. The server owns conversations by it, so it must not be guessable; older, shorter ids are replaced.
  clientId() {
    let id = localStorage.getItem("flywheel.client");
    if (!id || !/^[A-Za-z0-9_-]{22,128}$/.test(id)) {
      const bytes = crypto.getRandomValues(new Uint8Array(32));
      id = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
      localStorage.setItem("flywheel.client", id);
    }
    return id;
  },
  uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return "k" + Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
  },
  headers() {
    const h = { "Content-Type": "application/json", "X-Client-Id": fw.clientId() };
    const t = fw.token();
    if (t) h["Authorization"] = "Bearer " + t;
    return h;
  },
  async call(method, path, body) {
    const res = await fetch(path, { method, headers: fw.headers(), body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error((data.error && data.error.message) || ("HTTP " + res.status));
    return data;
  },
  // POST and read a text/event-stream: onEvent(obj) for each `data: {...}` line. `signal` (an AbortController's)
  // ends the request: the server then stops generating.
  async stream(path, body, onEvent, signal) {
    const res = await fetch(path, { method: "POST", headers: fw.headers(), body: JSON.stringify(body), signal });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || ("HTTP " + res.status));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  },
  // el("div", {class: "x", onclick: f}, child, "text", ...): children are nodes or strings (as text nodes); an
  // attribute whose value is null or undefined is left out.
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;  // an attribute left out
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "class") node.className = v;
      else if (k === "value") node.value = v;
      else if (k === "checked") node.checked = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  },
  // An icon drawn as inline SVG (no font needed to show it), with its accessible name on the element around it.
  icon(path) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "16");
    svg.setAttribute("height", "16");
    svg.setAttribute("aria-hidden", "true");
    const shape = document.createElementNS(ns, "path");
    shape.setAttribute("d", path);
    shape.setAttribute("fill", "currentColor");
    svg.appendChild(shape);
    return svg;
  },
  status(text, isError) {
    const box = document.getElementById("status");
    if (!box) return;
    box.textContent = text;
    box.className = isError ? "status error" : "status";
  },
  tokenBox() {
    const input = document.getElementById("token");
    if (!input) return;
    input.value = fw.token();
    input.addEventListener("change", () => { fw.setToken(input.value.trim()); location.reload(); });
  },
};

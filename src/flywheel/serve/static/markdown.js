// A small Markdown renderer for model answers that builds DOM nodes (never HTML strings): whatever the model writes,
// `<script>` or `<img onerror=...>` included, can only ever become text. It knows paragraphs (a single newline is a
// line break), # headings, > quotes, - / * / + and 1. lists, fenced ``` code blocks (with a language-<lang> class),
// `inline code`, **bold**, *italic* / _italic_, and [links](https://...) to http and https addresses only (others
// stay text). An unclosed fence (an answer still streaming, or cut off) runs to the end of the text.
"use strict";

const md = (() => {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBER = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;

  function node(tag, attrs, children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    for (const c of children || []) n.append(typeof c === "string" ? document.createTextNode(c) : c);
    return n;
  }

  function safeHref(url) {
    try {
      const u = new URL(url);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  const WORD = /[\p{L}\p{N}]/u;

  // Inline spans of one line or paragraph -> nodes. Code spans are literal; emphasis nests.
  function inline(text) {
    const out = [];
    let plain = "";
    const flush = () => { if (plain) { out.push(document.createTextNode(plain)); plain = ""; } };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "`") {
        const ticks = /^`+/.exec(text.slice(i))[0];
        const end = text.indexOf(ticks, i + ticks.length);
        if (end !== -1) {
          flush();
          out.push(node("code", {}, [text.slice(i + ticks.length, end)]));
          i = end + ticks.length;
          continue;
        }
        plain += ticks;
        i += ticks.length;
        continue;
      }
      if ((c === "*" || c === "_") && text[i + 1] === c) {
        const end = text.indexOf(c + c, i + 2);
        if (end > i + 2) {
          flush();
          out.push(node("strong", {}, inline(text.slice(i + 2, end))));
          i = end + 2;
          continue;
        }
      } else if ((c === "*" || c === "_") && text[i + 1] && text[i + 1] !== " ") {
        // _ inside a word (snake_case) is not emphasis
        const opens = c === "*" || i === 0 || !WORD.test(text[i - 1]);
        let end = text.indexOf(c, i + 1);
        while (end > 0 && text[end + 1] === c) end = text.indexOf(c, end + 2);
        const closes = end > i + 1 && text[end - 1] !== " " && (c === "*" || !WORD.test(text[end + 1] || ""));
        if (opens && closes) {
          flush();
          out.push(node("em", {}, inline(text.slice(i + 1, end))));
          i = end + 1;
          continue;
        }
      } else if (c === "[") {
        const m = /^\[([^\]\n]+)\]\(\s*<?([^\s()<>]+)>?\s*\)/.exec(text.slice(i));
        const href = m && safeHref(m[2]);
        if (href) {
          flush();
          out.push(node("a", { href, rel: "noopener noreferrer nofollow", target: "_blank" }, inline(m[1])));
          i += m[0].length;
          continue;
        }
      }
      plain += c;
      i += 1;
    }
    flush();
    return out;
  }

  // Lines joined by line breaks, each with its inline spans.
  function lines(list) {
    const out = [];
    list.forEach((line, k) => {
      if (k > 0) out.push(node("br"));
      out.push(...inline(line));
    });
    return out;
  }

  function codeBlock(lang, code) {
    const attrs = lang ? { class: "language-" + lang } : {};
    return node("pre", {}, [node("code", attrs, [code])]);
  }

  // Text -> a fragment of block nodes.
  function render(text) {
    const src = String(text).replace(/\r\n?/g, "\n").split("\n");
    const frag = document.createDocumentFragment();
    let para = [];
    let list = null; // {el, ordered}
    const endPara = () => { if (para.length) { frag.append(node("p", {}, lines(para))); para = []; } };
    const endList = () => { list = null; };
    for (let i = 0; i < src.length; i++) {
      const line = src[i];
      const fence = FENCE.exec(line);
      if (fence) {
        endPara(); endList();
        const mark = fence[1];
        const lang = /^[A-Za-z0-9_+.#-]{1,30}$/.test(fence[2]) ? fence[2] : ""; // else no language class
        const body = [];
        i += 1;
        while (i < src.length && !(src[i].trim().startsWith(mark[0].repeat(mark.length)) && src[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(src[i]);
          i += 1;
        }
        frag.append(codeBlock(lang, body.join("\n")));
        continue;
      }
      if (!line.trim()) { endPara(); endList(); continue; }
      const heading = HEADING.exec(line);
      if (heading) {
        endPara(); endList();
        frag.append(node("h" + Math.min(6, heading[1].length + 2), {}, inline(heading[2])));
        continue;
      }
      const bullet = BULLET.exec(line);
      const number = bullet ? null : NUMBER.exec(line);
      if (bullet || number) {
        endPara();
        const ordered = Boolean(number);
        if (!list || list.ordered !== ordered) {
          const attrs = ordered && number[1] !== "1" ? { start: String(Number(number[1])) } : {};
          list = { el: node(ordered ? "ol" : "ul", attrs), ordered };
          frag.append(list.el);
        }
        list.el.append(node("li", {}, inline(ordered ? number[2] : bullet[1])));
        continue;
      }
      if (list && /^\s+\S/.test(line)) { // an indented line continues the list item
        const item = list.el.lastChild;
        item.append(node("br"), ...inline(line.trim()));
        continue;
      }
      const quote = QUOTE.exec(line);
      if (quote) {
        endPara(); endList();
        const body = [quote[1]];
        while (i + 1 < src.length && QUOTE.test(src[i + 1])) { i += 1; body.push(QUOTE.exec(src[i])[1]); }
        frag.append(node("blockquote", {}, [node("p", {}, lines(body))]));
        continue;
      }
      endList();
      para.push(line);
    }
    endPara();
    return frag;
  }

  return { render, inline, safeHref };
})();

/* The case editor (testruns/admin/case_editor.py): a test case's variables and assertions as
 * rows over their JSON textareas. The textareas stay the form's fields: every change in the
 * rows is written back as JSON, and "Raw JSON" shows the textarea itself. Text typed as JSON
 * inside a row (a schema, a JSON value) is written as typed, so a mistake in it reaches the
 * server, which says at the field on which line and column it is. */
(function () {
  "use strict";

  const SPEC_KEYS = ["type", "value", "weight"];
  // Names a Jinja template reads without the card having to provide them.
  const TEMPLATE_WORDS = new Set(
    ("if elif else endif for endfor in not and or is set endset with endwith block endblock " +
      "macro endmacro call endcall filter endfilter raw endraw true false none True False None " +
      "loop range lipsum dict cycler joiner namespace caller super self varargs kwargs recursive")
      .split(" ")
  );
  let catalog = null;

  function types() {
    if (catalog === null) {
      const data = document.getElementById("case-editor-types");
      catalog = data ? JSON.parse(data.textContent) : { types: [], reference: "" };
      catalog.byName = new Map(catalog.types.map((t) => [t.name, t]));
    }
    return catalog;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") node.textContent = value;
      else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  // -- JSON written from rows ----------------------------------------------------------------

  /* Text the user typed as JSON: kept as typed when it does not parse. */
  class Raw {
    constructor(text) { this.text = text.trim(); }
  }

  function parseJSON(text) {
    try {
      return { ok: true, value: JSON.parse(text) };
    } catch (error) {
      return { ok: false, error: error.message };
    }
  }

  function compact(value) {
    if (value instanceof Raw) {
      const parsed = parseJSON(value.text);
      return parsed.ok ? compact(parsed.value) : value.text;
    }
    if (Array.isArray(value)) return "[" + value.map(compact).join(", ") + "]";
    if (value && typeof value === "object") {
      const items = Object.entries(value).map(([k, v]) => JSON.stringify(k) + ": " + compact(v));
      return "{" + items.join(", ") + "}";
    }
    return JSON.stringify(value);
  }

  /* One entry a line: a case's variables by name, its assertions one by one. */
  function pretty(entries, open, close) {
    return entries.length ? open + "\n  " + entries.join(",\n  ") + "\n" + close : open + close;
  }

  const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

  // -- Value inputs, one shape per kind of assertion ---------------------------------------

  function textOrJSON(value, cls, multiline) {
    const isText = value === undefined || typeof value === "string";
    const input = multiline
      ? el("textarea", { class: cls, rows: 2 })
      : el("input", { type: "text", class: cls });
    input.value = value === undefined ? "" : isText ? value : compact(value);
    const box = el("input", { type: "checkbox", class: "ce-as-json" });
    box.checked = !isText;
    const label = el("label", { class: "ce-json-label", title: "Read the text as JSON" }, box, " JSON");
    return {
      nodes: [input, label],
      read: () => (box.checked ? new Raw(input.value) : input.value),
      empty: () => (box.checked ? input.value.trim() === "" : input.value === ""),
    };
  }

  function numberInput(cls, value, placeholder) {
    const input = el("input", { type: "number", step: "any", min: "0", class: cls, placeholder });
    if (isNumber(value)) input.value = String(value);
    return input;
  }

  function labelled(text, input) {
    return el("label", { class: "ce-sub" }, el("span", { text }), input);
  }

  const KINDS = {
    text: {
      fits: (v) => typeof v === "string",
      build(value) {
        const input = el("input", { type: "text", class: "ce-value", placeholder: "text" });
        input.value = value === undefined ? "" : value;
        return { nodes: [input], read: () => (input.value === "" ? undefined : input.value) };
      },
    },
    rubric: {
      fits: (v) => typeof v === "string",
      build(value) {
        const input = el("textarea", { class: "ce-value", rows: 3, placeholder: "What a good answer does" });
        input.value = value === undefined ? "" : value;
        return { nodes: [input], read: () => (input.value === "" ? undefined : input.value) };
      },
    },
    "text-or-json": {
      fits: (v) => typeof v === "string" || typeof v === "object",
      build(value) {
        const field = textOrJSON(value, "ce-value", true);
        return { nodes: field.nodes, read: () => (field.empty() ? undefined : field.read()) };
      },
    },
    list: {
      fits: (v) => Array.isArray(v) && v.every((s) => typeof s === "string" && !s.includes("\n")),
      build(value) {
        const input = el("textarea", { class: "ce-value", rows: 3, placeholder: "one string per line" });
        input.value = value === undefined ? "" : value.join("\n");
        const read = () => {
          const items = input.value.split("\n").filter((line) => line.trim() !== "");
          return items.length ? items : undefined;
        };
        return { nodes: [input, el("span", { class: "ce-unit", text: "one per line" })], read };
      },
    },
    "number-ms": {
      fits: isNumber,
      build(value) {
        const input = numberInput("ce-value", value, "2000");
        const read = () => (input.value === "" ? undefined : Number(input.value));
        return { nodes: [input, el("span", { class: "ce-unit", text: "ms" })], read };
      },
    },
    "number-usd": {
      fits: isNumber,
      build(value) {
        const input = numberInput("ce-value", value, "0.01");
        const read = () => (input.value === "" ? undefined : Number(input.value));
        return { nodes: [input, el("span", { class: "ce-unit", text: "$ (the provider's prices)" })], read };
      },
    },
    schema: {
      fits: (v) => v !== undefined,
      build(value) {
        const input = el("textarea", { class: "ce-value ce-code", rows: 4,
          placeholder: '{"type": "object", "required": ["status"]}' });
        input.value = value === undefined || value === null ? "" : JSON.stringify(value, null, 2);
        return { nodes: [input], read: () => (input.value.trim() === "" ? undefined : new Raw(input.value)) };
      },
    },
    "json-path": {
      fits: (v) => isObject(v) && Object.keys(v).every((k) => k === "path" || k === "equals") &&
        (v.path === undefined || typeof v.path === "string"),
      build(value) {
        value = value || {};
        const path = el("input", { type: "text", class: "ce-path", placeholder: "$.status" });
        path.value = value.path || "";
        const equals = textOrJSON(value.equals, "ce-equals", false);
        return {
          nodes: [labelled("path", path), labelled("equals", equals.nodes[0]), equals.nodes[1]],
          read: () => ({ path: path.value, equals: equals.read() }),
        };
      },
    },
    levenshtein: {
      fits: (v) => isObject(v) && Object.keys(v).every((k) => k === "expected" || k === "max") &&
        (v.expected === undefined || typeof v.expected === "string") &&
        (v.max === undefined || isNumber(v.max)),
      build(value) {
        value = value || {};
        const expected = el("textarea", { class: "ce-expected", rows: 2, placeholder: "expected text" });
        expected.value = value.expected || "";
        const max = numberInput("ce-max", value.max, "3");
        max.step = "1";
        const read = () => {
          const spec = { expected: expected.value };
          if (max.value !== "") spec.max = Number(max.value);
          return spec;
        };
        return { nodes: [labelled("expected", expected), labelled("max edits", max)], read };
      },
    },
    "word-count": {
      fits: (v) => isObject(v) && Object.entries(v).every(([k, n]) => (k === "min" || k === "max") && isNumber(n)),
      build(value) {
        value = value || {};
        const low = numberInput("ce-min", value.min, "min");
        const high = numberInput("ce-max", value.max, "max");
        low.step = high.step = "1";
        const read = () => {
          const spec = {};
          if (low.value !== "") spec.min = Number(low.value);
          if (high.value !== "") spec.max = Number(high.value);
          return spec;
        };
        return { nodes: [labelled("min", low), labelled("max", high)], read };
      },
    },
    json: {  // a type the editor does not know: its value as JSON
      fits: () => true,
      build(value) {
        const input = el("textarea", { class: "ce-value ce-code", rows: 2, placeholder: "value as JSON" });
        input.value = value === undefined ? "" : JSON.stringify(value);
        return { nodes: [input], read: () => (input.value.trim() === "" ? undefined : new Raw(input.value)) };
      },
    },
  };
  KINDS["schema-optional"] = KINDS.schema;

  const kindOf = (type) => (types().byName.get(type) || { kind: "json" }).kind;
  const anchor = (name) => name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");

  // -- The shared frame: a toolbar with "Raw JSON", the rows, the textarea -----------------

  class Editor {
    constructor(root) {
      this.root = root;
      this.textarea = root.querySelector("textarea");
      this.rows = el("div", { class: "ce-rows" });
      this.rawBox = el("input", { type: "checkbox", class: "ce-raw-toggle" });
      this.note = el("span", { class: "ce-note", role: "status" });
      const toolbar = el("div", { class: "ce-toolbar" },
        el("label", { class: "ce-raw-label" }, this.rawBox, " Raw JSON"), this.note);
      this.addButton = el("button", { type: "button", class: "ce-add" });
      root.prepend(toolbar, this.rows, this.addButton);
      this.rawBox.addEventListener("change", () => this.setRaw(this.rawBox.checked));
      this.rows.addEventListener("input", () => this.write());
      this.rows.addEventListener("change", () => this.write());
      this.textarea.addEventListener("input", () => this.checkRaw());
      this.addButton.addEventListener("click", () => { this.addRow(); this.write(); });
      root.classList.add("ce-ready");
    }

    start() {
      this.setRaw(!this.load(this.textarea.value));
      this.markErrors();
    }

    /* Rows from the JSON text; false when the text cannot be shown as rows. */
    load(text) {
      const parsed = parseJSON(text.trim() === "" ? this.emptyJSON : text);
      if (!parsed.ok) {
        this.note.textContent = "The JSON does not parse, so it shows as text: " + parsed.error;
        return false;
      }
      if (!this.fits(parsed.value)) {
        this.note.textContent = this.doesNotFit;
        this.note.dataset.parse = "fits";
        return false;
      }
      this.rows.replaceChildren();
      this.fill(parsed.value);
      this.note.textContent = "";
      this.note.dataset.parse = "ok";
      return true;
    }

    setRaw(raw) {
      if (!raw && this.raw && !this.load(this.textarea.value)) raw = true;  // the text is the only view
      if (raw && this.raw === false) this.write();
      this.raw = raw;
      this.rawBox.checked = raw;
      this.root.classList.toggle("ce-raw", raw);
    }

    /* While the text is typed: whether it parses (the server's message says where it breaks). */
    checkRaw() {
      if (!this.raw) return;
      const parsed = parseJSON(this.textarea.value.trim() === "" ? this.emptyJSON : this.textarea.value);
      if (!parsed.ok) this.note.textContent = "Not valid JSON yet: " + parsed.error;
      else if (this.note.dataset.parse !== "fits") this.note.textContent = "";
      this.note.dataset.parse = parsed.ok ? "ok" : "broken";
    }

    write() {
      if (!this.raw) this.textarea.value = this.serialize();
    }

    /* The field's server errors (above the editor), also at the row they are about. */
    markErrors() {
      const row = this.root.closest(".form-row");
      const list = row && row.querySelector(".errorlist");
      if (!list) return;
      for (const item of list.querySelectorAll("li")) this.markError(item.textContent);
    }

    rowNote(row, message) {
      row.classList.add("ce-row-error");
      row.querySelector(".ce-row-note").textContent = message;
    }
  }

  // -- Variables ----------------------------------------------------------------------------

  class VariablesEditor extends Editor {
    constructor(root) {
      super(root);
      this.emptyJSON = "{}";
      this.doesNotFit = "Variables must be a JSON object; it shows as text.";
      this.addButton.textContent = "Add variable";
      this.fromServer = parseJSON(this.textarea.dataset.templateVariables || "[]").value || [];
    }

    fits(value) { return isObject(value); }

    fill(variables) {
      const required = this.required();
      for (const name of required) this.addRow(name, variables[name], true);
      for (const [name, value] of Object.entries(variables)) {
        if (!required.includes(name)) this.addRow(name, value, false);
      }
    }

    required() {
      return templateVariables(this.fromServer);
    }

    addRow(name = "", value, required = false) {
      const key = el("input", { type: "text", class: "ce-key", placeholder: "name", "aria-label": "Variable name" });
      key.value = name;
      // An empty string that is there stays there (as JSON ""): an empty row is left out.
      const field = textOrJSON(value === "" ? new Raw('""') : value, "ce-value", true);
      const input = field.nodes[0];
      input.placeholder = required ? "the template reads it" : "value";
      const label = () => input.setAttribute("aria-label", "Value of " + (key.value || "the new variable"));
      label();
      key.addEventListener("input", label);
      const remove = el("button", { type: "button", class: "ce-remove", title: "Remove this variable", text: "✕" });
      const row = el("div", { class: "ce-row ce-var-row" }, key, ...field.nodes, remove,
        el("div", { class: "ce-row-note" }));
      row.read = field.read;
      row.empty = field.empty;
      this.setRequired(row, required);
      remove.addEventListener("click", () => { row.remove(); this.write(); });
      this.rows.append(row);
      return row;
    }

    setRequired(row, required) {
      row.classList.toggle("ce-required", required);
      row.querySelector(".ce-key").readOnly = required;
      row.querySelector(".ce-key").title = required ? "The card's prompt reads this variable" : "";
    }

    /* The prompt changed on the page: rows for the names it reads now. */
    refreshRequired() {
      if (this.raw) return;
      const required = this.required();
      const rows = [...this.rows.children];
      for (const row of rows) {
        const name = row.querySelector(".ce-key").value;
        const needed = required.includes(name);
        if (!needed && row.classList.contains("ce-required") && row.empty()) row.remove();
        else this.setRequired(row, needed);
      }
      const have = new Set(rows.map((row) => row.querySelector(".ce-key").value));
      let before = this.rows.querySelector(".ce-row:not(.ce-required)");
      for (const name of required.filter((n) => !have.has(n))) {
        const row = this.addRow(name, undefined, true);
        if (before) this.rows.insertBefore(row, before);
      }
      this.write();
    }

    serialize() {
      const entries = [];
      const seen = new Set();
      for (const row of this.rows.children) {
        const name = row.querySelector(".ce-key").value;
        row.classList.toggle("ce-row-error", seen.has(name));
        row.querySelector(".ce-row-note").textContent = seen.has(name) ? "This name is used twice." : "";
        if (!name || row.empty()) continue;  // an empty value is left out: the server names it
        seen.add(name);
        entries.push(JSON.stringify(name) + ": " + compact(row.read()));
      }
      return pretty(entries, "{", "}");
    }

    markError(message) {
      const missing = /Missing variables for the template: (.*)\.$/.exec(message.trim());
      if (!missing) return;
      const names = missing[1].split(", ");
      for (const row of this.rows.children) {
        if (names.includes(row.querySelector(".ce-key").value)) this.rowNote(row, "Missing: give it a value.");
      }
    }
  }

  /* What the card's prompt reads: the server's names for the saved prompt, and on the card's
   * page the names its template and system prompt fields read now. */
  function templateVariables(fromServer) {
    const fields = ["id_template", "id_system_prompt"].map((id) => document.getElementById(id)).filter(Boolean);
    if (!fields.length) return fromServer;
    const text = fields.map((f) => f.value).join("\n");
    const names = new Set(fromServer.filter((n) => new RegExp("\\b" + n + "\\b").test(text)));
    const bound = new Set();
    const tags = [...text.matchAll(/\{\{([\s\S]*?)\}\}|\{%([\s\S]*?)%\}/g)].map((m) => m[1] ?? m[2]);
    for (const tag of tags) {
      const loop = /^\s*-?\s*for\s+([\w\s,]+?)\s+in\b/.exec(tag);
      if (loop) loop[1].split(",").forEach((n) => bound.add(n.trim()));
      const set = /^\s*-?\s*set\s+(\w+)/.exec(tag);
      if (set) bound.add(set[1]);
    }
    for (const tag of tags) {
      const bare = tag.replace(/"[^"]*"|'[^']*'/g, " ").replace(/\|\s*\w+/g, " ").replace(/\bis\s+(not\s+)?\w+/g, " ");
      for (const match of bare.matchAll(/(^|[^.\w])([A-Za-z_]\w*)/g)) {
        const name = match[2];
        if (!TEMPLATE_WORDS.has(name) && !bound.has(name) && !/^\s*\(/.test(bare.slice(match.index + match[0].length))) {
          names.add(name);
        }
      }
    }
    return [...names].sort();
  }

  // -- Assertions ---------------------------------------------------------------------------

  class AssertionsEditor extends Editor {
    constructor(root) {
      super(root);
      this.emptyJSON = "[]";
      this.doesNotFit = "Some assertions cannot be shown as rows (not objects, or other keys); they show as text.";
      this.addButton.textContent = "Add assertion";
      const reference = root.dataset.reference || types().reference;
      if (reference) {
        this.note.before(el("a", { class: "ce-reference", href: reference, target: "_blank", rel: "noopener",
          text: "Assertion reference" }));
      }
    }

    fits(value) {
      return Array.isArray(value) && value.every((spec) => isObject(spec) && typeof spec.type === "string" &&
        Object.keys(spec).every((k) => SPEC_KEYS.includes(k)) &&
        (spec.weight === undefined || isNumber(spec.weight)) &&
        (spec.value === undefined || KINDS[kindOf(spec.type)].fits(spec.value)));
    }

    fill(assertions) {
      for (const spec of assertions) this.addRow(spec);
    }

    typeSelect(current) {
      const select = el("select", { class: "ce-type", "aria-label": "Assertion type" });
      if (!types().byName.has(current)) {
        select.append(el("option", { value: current, text: current + " (unknown type)" }));
      }
      const groups = [["Assertions", (t) => !t.name.startsWith("not-")], ["Negated (not-)", (t) => t.name.startsWith("not-")]];
      for (const [label, wanted] of groups) {
        const group = el("optgroup", { label });
        for (const t of types().types.filter(wanted)) group.append(el("option", { value: t.name, text: t.name }));
        select.append(group);
      }
      select.value = current;
      return select;
    }

    addRow(spec = { type: "contains" }) {
      const select = this.typeSelect(spec.type);
      const area = el("div", { class: "ce-value-area" });
      const weight = numberInput("ce-weight", spec.weight, "1");
      weight.title = "Weight: counts with a threshold (default 1)";
      const remove = el("button", { type: "button", class: "ce-remove", title: "Remove this assertion", text: "✕" });
      const help = el("div", { class: "ce-help" });
      const row = el("div", { class: "ce-row ce-assert-row" }, select, area,
        labelled("weight", weight), remove, help, el("div", { class: "ce-row-note" }));
      const build = (value) => {
        const editor = KINDS[kindOf(select.value)].build(value);
        area.replaceChildren(...editor.nodes);
        row.readValue = editor.read;
        const known = types().byName.get(select.value);
        help.replaceChildren(known ? known.help : "Unknown type: pick one from the list.", " ");
        const reference = this.root.dataset.reference || types().reference;
        if (reference && known) {
          help.append(el("a", { href: reference + "#" + anchor(select.value), target: "_blank", rel: "noopener",
            text: "Reference" }));
        }
      };
      build(spec.value);
      select.addEventListener("change", () => {
        // The value goes along when the new type takes its shape (an unknown type's JSON
        // value, once the type is corrected, or contains to icontains).
        let value = row.readValue();
        if (value instanceof Raw) value = parseJSON(value.text).ok ? JSON.parse(value.text) : undefined;
        const fits = value !== undefined && KINDS[kindOf(select.value)].fits(value);
        build(fits ? value : undefined);
        row.classList.remove("ce-row-error");
        row.querySelector(".ce-row-note").textContent = "";
        this.write();
      });
      row.read = () => {
        const out = { type: select.value };
        const value = row.readValue();
        if (value !== undefined) out.value = value;
        if (weight.value !== "") out.weight = Number(weight.value);
        return out;
      };
      remove.addEventListener("click", () => { row.remove(); this.write(); });
      this.rows.append(row);
      return row;
    }

    serialize() {
      return pretty([...this.rows.children].map((row) => compact(row.read())), "[", "]");
    }

    markError(message) {
      const at = /^assertion (\d+)(?: \([^)]*\))?: (.*)$/.exec(message.trim());
      const row = at && this.rows.children[Number(at[1]) - 1];
      if (row) this.rowNote(row, at[2]);
    }
  }

  // -- Start: each editor on the page, each case added later, the prompt as it is typed ----

  const editors = [];

  function enhance(scope) {
    for (const root of scope.querySelectorAll(".case-editor:not(.ce-ready)")) {
      if (root.closest(".empty-form")) continue;  // the inline's template for "Add another"
      const editor = root.dataset.editor === "variables" ? new VariablesEditor(root) : new AssertionsEditor(root);
      editor.start();
      editors.push(editor);
    }
  }

  function start() {
    enhance(document);
    document.addEventListener("formset:added", (event) => enhance(event.target));
    for (const id of ["id_template", "id_system_prompt"]) {
      const field = document.getElementById(id);
      if (field) {
        field.addEventListener("input", () => {
          for (const editor of editors) if (editor instanceof VariablesEditor) editor.refreshRequired();
        });
      }
    }
    // A last write on submit, whatever event the rows missed (a value set by a script).
    document.addEventListener("submit", () => editors.forEach((editor) => editor.write()), true);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

// The API docs page: reads /openapi.json from this server and lists its endpoints. It loads nothing else, and it
// builds the page with DOM nodes and textContent only (no HTML from the description is ever parsed).
"use strict";

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// Docstrings mark code as ``this`` (reStructuredText) or `this`: such a part becomes a <code> node, the rest text.
function prose(tag, cls, text) {
  const node = el(tag, cls);
  const parts = String(text || "").split(/``([\s\S]+?)``|`([^`\n]+)`/);
  for (let i = 0; i < parts.length; i += 3) {
    if (parts[i]) node.appendChild(document.createTextNode(parts[i]));
    const code = parts[i + 1] !== undefined ? parts[i + 1] : parts[i + 2];
    if (code !== undefined) node.appendChild(el("code", null, code));
  }
  return node;
}

function resolve(spec, schema, depth) {
  if (!schema || depth > 8) return schema || {};
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return resolve(spec, (spec.components && spec.components.schemas || {})[name] || {}, depth + 1);
  }
  return schema;
}

function typeOf(spec, schema, depth) {
  schema = resolve(spec, schema, depth || 0);
  if (schema.anyOf || schema.oneOf) {
    return (schema.anyOf || schema.oneOf).map((s) => typeOf(spec, s, (depth || 0) + 1)).join(" | ");
  }
  if (schema.type === "array") return typeOf(spec, schema.items || {}, (depth || 0) + 1) + "[]";
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  return schema.type || schema.title || "object";
}

function limits(schema) {
  const parts = [];
  const keys = [["minimum", "≥"], ["exclusiveMinimum", ">"], ["maximum", "≤"], ["exclusiveMaximum", "<"],
                ["minLength", "min length"], ["maxLength", "max length"], ["minItems", "min items"],
                ["maxItems", "max items"], ["pattern", "pattern"]];
  for (const [key, label] of keys) if (schema[key] !== undefined) parts.push(label + " " + schema[key]);
  if (schema.default !== undefined) parts.push("default " + JSON.stringify(schema.default));
  return parts.join(", ");
}

function fieldTable(spec, rows) {
  const table = el("table");
  const head = el("tr");
  for (const h of ["name", "type", "required", "limits", "description"]) head.appendChild(el("th", null, h));
  table.appendChild(head);
  for (const r of rows) {
    const tr = el("tr");
    tr.appendChild(el("td", "mono", r.name));
    tr.appendChild(el("td", "mono", typeOf(spec, r.schema)));
    tr.appendChild(el("td", null, r.required ? "yes" : ""));
    tr.appendChild(el("td", "mono", limits(resolve(spec, r.schema, 0))));
    tr.appendChild(prose("td", null, r.description || resolve(spec, r.schema, 0).description || ""));
    table.appendChild(tr);
  }
  return table;
}

function operation(spec, path, method, op, index) {
  const section = el("section", "op");
  section.id = "op-" + index;
  const h = el("h2");
  h.appendChild(el("span", "method " + method, method.toUpperCase()));
  h.appendChild(document.createTextNode(path));
  for (const tag of op.tags || []) h.appendChild(el("span", "tag", tag));
  section.appendChild(h);
  if (op.summary) section.appendChild(prose("p", "desc", op.summary));
  if (op.description && op.description !== op.summary) section.appendChild(prose("p", "desc", op.description));
  const params = (op.parameters || []).map((p) => ({name: p.name + " (" + p.in + ")", schema: p.schema || {},
                                                    required: p.required, description: p.description}));
  if (params.length) {
    section.appendChild(el("h3", null, "parameters"));
    section.appendChild(fieldTable(spec, params));
  }
  const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  if (body) {
    const schema = resolve(spec, body.schema, 0);
    section.appendChild(el("h3", null, "JSON body" + (schema.title ? ": " + schema.title : "")));
    const required = new Set(schema.required || []);
    const rows = Object.entries(schema.properties || {}).map(([name, s]) => ({name, schema: s,
                                                                              required: required.has(name)}));
    section.appendChild(fieldTable(spec, rows));
  }
  const codes = Object.entries(op.responses || {}).map(([code, r]) => code + " " + (r.description || ""));
  if (codes.length) section.appendChild(el("p", "mono", "responses: " + codes.join(" · ")));
  return section;
}

async function main() {
  const endpoints = document.getElementById("endpoints");
  const toc = document.getElementById("toc");
  let spec;
  try {
    const response = await fetch("/openapi.json", {credentials: "same-origin"});
    if (!response.ok) throw new Error("GET /openapi.json answered " + response.status);
    spec = await response.json();
  } catch (err) {
    endpoints.appendChild(el("p", null, "Could not read the OpenAPI description: " + err.message)).id = "error";
    return;
  }
  const info = spec.info || {};
  document.getElementById("title").textContent = (info.title || "API") + " " + (info.version || "");
  if (info.description) document.getElementById("summary").textContent = info.description;
  let index = 0;
  for (const [path, methods] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(methods)) {
      const link = el("a", null, method.toUpperCase() + " " + path);
      link.href = "#op-" + index;
      toc.appendChild(link);
      endpoints.appendChild(operation(spec, path, method, op, index));
      index += 1;
    }
  }
}

document.addEventListener("DOMContentLoaded", main);

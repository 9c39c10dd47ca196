// Keeps a pasted token for this tab (sessionStorage) and goes back to the
// page that asked for it. `next` is only ever a path on this origin.
"use strict";

import { setToken } from "./common.js";

function next() {
  const asked = new URLSearchParams(location.search).get("next") || "/wallet";
  // A path of this service only: never another origin (no open redirect).
  return asked.startsWith("/") && !asked.startsWith("//") ? asked : "/wallet";
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  if (!value) return;
  setToken(value);
  location.assign(next());
});

// The development sign-in exists only outside production; ask, don't assume.
fetch("/dev/sign-in", { method: "GET", cache: "no-store" }).then((r) => {
  document.getElementById("dev").hidden = !r.ok;
}).catch(() => {});

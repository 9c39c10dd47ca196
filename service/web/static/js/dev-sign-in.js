// Development sign-in: asks the service for an employee token and keeps it
// for this tab. The POST carries the CSRF token from the tl_csrf cookie
// (double submit), which another site can neither read nor set.
"use strict";

import { setToken } from "./common.js";

function csrf() {
  const found = document.cookie.split("; ").find((c) => c.startsWith("tl_csrf="));
  return found ? found.slice("tl_csrf=".length) : "";
}

document.getElementById("dev-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const employee = document.getElementById("employee").value.trim();
  const role = document.getElementById("role").value;
  const status = document.getElementById("status");
  const response = await fetch("/dev/sign-in", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: JSON.stringify({ employee, role }),
    credentials: "same-origin",
  });
  const body = await response.json();
  if (!response.ok) {
    status.hidden = false;
    status.dataset.kind = "error";
    status.textContent = body.detail || "Sign-in failed.";
    return;
  }
  setToken(body.token);
  location.assign(role === "employee" ? "/wallet" : "/finance");
});

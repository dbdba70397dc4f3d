// The Copy button next to a token shown once (#token, #copy, #copied).
document.getElementById("copy").addEventListener("click", async () => {
  const token = document.getElementById("token"), status = document.getElementById("copied");
  try {
    await navigator.clipboard.writeText(token.textContent);
    status.textContent = "Copied.";
  } catch (error) {  // no clipboard on plain http: select the token for Ctrl+C instead
    const range = document.createRange();
    range.selectNodeContents(token);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    status.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
  }
});
